//! `deploy/kubernetes/`: the manifests parse, and what they say about warren
//! agrees with warren itself: the config they mount is valid and is where the
//! container reads it, the probes ask the ops port for the health paths, the
//! grace period outlasts the drain, the broker URLs come from the variable
//! warren reads, and KEDA scales this Deployment on a pipeline's queue,
//! counting unacknowledged messages. No broker or cluster is needed (nor
//! available here: applying them is not tested).

use std::path::{Path, PathBuf};

use warren::config::{BROKER_URL_ENV, Config};
use yaml_rust2::{Yaml, YamlLoader};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every document of every manifest in the directory.
fn documents() -> Vec<Yaml> {
    let mut docs = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "manifests missing: {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let parsed = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", f.display()));
        docs.extend(parsed.into_iter().filter(|d| !d.is_null()));
    }
    docs
}

/// The one document of `kind` named `name`.
fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|d| {
            d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name)
        })
        .collect();
    assert_eq!(found.len(), 1, "{kind} {name}");
    found[0]
}

fn only<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[], Vec::as_slice)
}

fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {y:?}"))
}

/// The image's default command (`CMD [...]` in the Dockerfile).
fn dockerfile_cmd() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile"))
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("CMD "))
        .expect("CMD in Dockerfile");
    serde_json::from_str(&line["CMD ".len()..]).expect("CMD in exec form")
}

#[test]
fn the_kubernetes_manifests_agree_with_warren() {
    let docs = documents();
    let deployment = only(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = list(&pod["containers"]);
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    // The selector selects the pods of the template.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in deployment["spec"]["selector"]["matchLabels"]
        .as_hash()
        .expect("matchLabels")
    {
        assert_eq!(&labels[str_of(k, "label")], v, "selector label {k:?}");
    }

    // The config file: the path the container reads (the image's CMD,
    // repeated in args) is a key of the ConfigMap mounted at its directory.
    let args: Vec<&str> = list(&c["args"]).iter().map(|a| str_of(a, "arg")).collect();
    assert_eq!(args, dockerfile_cmd(), "args differ from the image's CMD");
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config")
        + 1;
    let config_path = Path::new(args[at]);
    let mount = |volume: &str| -> &Yaml {
        list(&c["volumeMounts"])
            .iter()
            .find(|m| m["name"].as_str() == Some(volume))
            .unwrap_or_else(|| panic!("no mount of volume {volume}"))
    };
    let volume = |name: &str| -> &Yaml {
        list(&pod["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let config_mount = list(&c["volumeMounts"])
        .iter()
        .find(|m| Some(Path::new(str_of(&m["mountPath"], "mountPath"))) == config_path.parent())
        .expect("a volume mounted at the config file's directory");
    assert!(
        config_mount["subPath"].is_badvalue(),
        "subPath mounts are never updated"
    );
    let config_volume = volume(str_of(&config_mount["name"], "mount name"));
    let config_map = find(
        &docs,
        "ConfigMap",
        str_of(&config_volume["configMap"]["name"], "configMap name"),
    );
    let file_name = config_path.file_name().and_then(|n| n.to_str()).unwrap();
    let toml = str_of(&config_map["data"][file_name], "the config file");
    // Validated as `warren run` would (plugin files are not read here).
    let config = Config::parse(toml, Path::new("/etc/warren")).expect("a valid warren.toml");

    // Probes and port: the ops endpoint's port, its health paths.
    let ops = config.ops.listen_addr().unwrap().expect("ops enabled");
    assert!(
        ops.ip().is_unspecified(),
        "ops.listen {ops} is unreachable for the kubelet"
    );
    let ports = list(&c["ports"]);
    let ops_port = ports
        .iter()
        .find(|p| p["containerPort"].as_i64() == Some(i64::from(ops.port())))
        .expect("the ops port is a container port");
    let port_name = str_of(&ops_port["name"], "port name");
    for (probe, path) in [
        ("readinessProbe", "/healthz/ready"),
        ("livenessProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        let port = &get["port"];
        assert!(
            port.as_str() == Some(port_name) || port.as_i64() == Some(i64::from(ops.port())),
            "{probe} port {port:?}"
        );
    }
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile"))
            .unwrap();
    assert!(dockerfile.contains(&format!("EXPOSE {}", ops.port())));

    // The grace period outlasts the drain, with room for the close.
    let grace_s = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    let grace_ms = u64::try_from(grace_s).unwrap() * 1000;
    let drain_ms = config.ops.shutdown_grace_ms;
    assert!(
        grace_ms >= drain_ms + 5000,
        "terminationGracePeriodSeconds {grace_s} s does not outlast ops.shutdown_grace_ms {drain_ms} ms"
    );
    assert!(grace_ms > warren::config::OpsConfig::default().shutdown_grace_ms);

    // Plugins: every pipeline's file lies in a whole-volume mount.
    for p in &config.pipelines {
        let mounted = list(&c["volumeMounts"]).iter().any(|m| {
            m["subPath"].is_badvalue()
                && p.plugin.starts_with(str_of(&m["mountPath"], "mountPath"))
                && m["mountPath"].as_str() != Some("/etc/warren")
        });
        assert!(
            mounted,
            "plugin {} of {} is not on a mounted volume",
            p.plugin.display(),
            p.name
        );
    }
    assert!(!volume("plugins")["configMap"]["name"].is_badvalue());
    assert!(mount("plugins")["subPath"].is_badvalue());
    if let Some(cache) = list(&c["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some("WARREN_CACHE_DIR"))
    {
        let dir = str_of(&cache["value"], "WARREN_CACHE_DIR");
        assert!(
            list(&c["volumeMounts"])
                .iter()
                .any(|m| m["mountPath"].as_str() == Some(dir)),
            "the cache directory {dir} is not a volume (the root file system is read-only)"
        );
    }

    // The broker URLs: warren's variable, from the Secret, a valid list.
    let env = list(&c["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some(BROKER_URL_ENV))
        .expect("WARREN_BROKER_URL in env");
    let key_ref = &env["valueFrom"]["secretKeyRef"];
    let secret = find(&docs, "Secret", str_of(&key_ref["name"], "secret name"));
    let urls = str_of(
        &secret["stringData"][str_of(&key_ref["key"], "key")],
        "URLs",
    );
    let mut with_urls = config.clone();
    with_urls.broker.override_url(urls.to_string());
    with_urls.validate().expect("WARREN_BROKER_URL is valid");
    assert!(with_urls.broker.endpoints().len() >= 2, "a cluster's nodes");

    // KEDA: this Deployment, a configured queue, unacknowledged counted.
    let scaled = only(&docs, "ScaledObject");
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let triggers = list(&scaled["spec"]["triggers"]);
    assert!(!triggers.is_empty());
    for t in triggers {
        assert_eq!(t["type"].as_str(), Some("rabbitmq"));
        let m = &t["metadata"];
        assert_eq!(
            m["protocol"].as_str(),
            Some("http"),
            "amqp counts only ready messages"
        );
        assert_eq!(m["mode"].as_str(), Some("QueueLength"));
        let queue = str_of(&m["queueName"], "queueName");
        assert!(
            config.pipelines.iter().any(|p| p.queue == queue),
            "KEDA watches {queue}, which no pipeline consumes"
        );
        let auth = find(
            &docs,
            "TriggerAuthentication",
            str_of(&t["authenticationRef"]["name"], "authenticationRef"),
        );
        let host = list(&auth["spec"]["secretTargetRef"])
            .iter()
            .find(|r| r["parameter"].as_str() == Some("host"))
            .expect("the host parameter from a Secret");
        let secret = find(&docs, "Secret", str_of(&host["name"], "secret name"));
        let url = str_of(&secret["stringData"][str_of(&host["key"], "key")], "host");
        assert!(
            url.starts_with("http://") || url.starts_with("https://"),
            "{url}"
        );
    }
}
