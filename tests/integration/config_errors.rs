//! Bad configuration and bad plugin files fail early with errors that say what
//! and where.

use std::path::PathBuf;
use std::time::Duration;

use warren_tests::{Client, config, plugin, start, unique};

use crate::{pipeline, pipeline_at};

fn start_error(plugin: &std::path::Path) -> String {
    start_error_with(plugin, "")
}

/// Why `warren::start` refuses this pipeline (`extra` goes inside it).
fn start_error_with(plugin: &std::path::Path, extra: &str) -> String {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cfg = config(&pipeline_at("bad", &unique("bad"), plugin, extra)).expect("config parses");
    match rt.block_on(warren::start(cfg)) {
        Ok(_) => panic!("warren started with plugin {}", plugin.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(unique("plugin-files"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write temp file");
    p
}

#[test]
fn unknown_fields_are_rejected_with_their_name() {
    let err =
        config("[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"p.wasm\"\nprefech = 3\n")
            .map(|_| ())
            .map_err(|e| format!("{e:#}"));
    let err = err.expect_err("typo accepted");
    assert!(err.contains("prefech"), "{err}");
}

#[test]
fn semantic_errors_name_the_pipeline() {
    let err =
        config("[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"p.wasm\"\nconcurrency = 0\n")
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
            .expect_err("concurrency 0 accepted");
    assert!(
        err.contains("pipeline \"x\"") && err.contains("concurrency"),
        "{err}"
    );
    // Far more threads than the machine can run aborted warren; now it is refused.
    let err = config(
        "[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"p.wasm\"\nconcurrency = 100000\n",
    )
    .map(|_| ())
    .map_err(|e| format!("{e:#}"))
    .expect_err("concurrency 100000 accepted");
    assert!(
        err.contains("concurrency must be between 1 and 1024"),
        "{err}"
    );
    let err = config("")
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
        .expect_err("no pipelines accepted");
    assert!(err.contains("no [[pipeline]]"), "{err}");
}

#[test]
fn a_missing_plugin_file_is_named() {
    let missing = std::env::temp_dir()
        .join(unique("missing"))
        .join("nope.wasm");
    let err = start_error(&missing);
    assert!(
        err.contains("nope.wasm") && err.contains("cannot read"),
        "{err}"
    );
    assert!(err.contains("pipeline \"bad\""), "{err}");
}

#[test]
fn files_that_are_not_components_are_explained() {
    let err = start_error(&temp_file("garbage.wasm", b"this is not wasm at all"));
    assert!(err.contains("not a WebAssembly component"), "{err}");
    let err = start_error(&temp_file("core.wasm", b"\0asm\x01\0\0\0"));
    assert!(err.contains("core WebAssembly module"), "{err}");
    let err = start_error(&temp_file("empty.wasm", b""));
    assert!(err.contains("empty"), "{err}");
    // A real component, cut short: the compiler's complaint is passed on.
    let bytes = std::fs::read(plugin("noop")).expect("noop plugin built");
    let err = start_error(&temp_file("truncated.wasm", &bytes[..bytes.len() / 2]));
    assert!(err.contains("compiling the component"), "{err}");
}

#[test]
fn a_memory_limit_below_the_plugins_initial_memory_fails_the_start() {
    // Every Rust plugin's memory starts at 17 pages (1.06 MiB).
    let err = start_error_with(&plugin("noop"), "[pipeline.limits]\nmemory_mib = 1\n");
    assert!(
        err.contains("pipeline \"bad\"")
            && err.contains("limits.memory_mib = 1 is too small")
            && err.contains("set at least 2"),
        "{err}"
    );
}

/// The longest retry delay the configuration allows is accepted by the broker
/// end to end: as the retry queue's `x-message-ttl` when it is declared, and as
/// the `expiration` of a message parked in it.
#[tokio::test]
async fn the_longest_retry_delay_is_accepted_by_the_broker() -> anyhow::Result<()> {
    let q = unique("ttl-limit");
    let extra = "[pipeline.retry]\nmax_attempts = 2\ninitial_delay_ms = 4294967295\n\
                 max_delay_ms = 4294967295\njitter = 0.0\n";
    let warren = start(config(&pipeline("ttl", &q, "probe", extra))?).await?;
    let client = Client::connect().await?;
    client.send(&q, b"retry later").await?;
    let tier = format!("{q}.retry.4294967295");
    let parked = client.take_one(&tier, Duration::from_secs(20)).await?;
    assert_eq!(parked.data, b"retry later");
    assert_eq!(
        parked.properties.expiration().as_ref().map(|e| e.as_str()),
        Some("4294967295")
    );
    warren.shutdown().await;
    Ok(())
}

/// What validation lets through, `run` serves: the largest values of each
/// range start and consume.
#[tokio::test]
async fn the_upper_ends_of_the_ranges_are_served() -> anyhow::Result<()> {
    let extra = "concurrency = 1024\n[pipeline.limits]\ntimeout_ms = 86400000\nmemory_mib = 4096\n";
    let cfg = config(&pipeline("upper", &unique("upper"), "noop", extra))?;
    assert_eq!(
        cfg.pipelines[0].limits.timeout(),
        Duration::from_secs(86_400)
    );
    let warren = start(cfg).await?;
    warren.shutdown().await;
    Ok(())
}

/// Why this pipeline's configuration is refused (`extra` goes inside it).
fn config_error(extra: &str) -> String {
    config(&format!(
        "[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"p.wasm\"\n{extra}\n"
    ))
    .map(|_| ())
    .map_err(|e| format!("{e:#}"))
    .expect_err(&format!("accepted: {extra}"))
}

#[test]
fn a_rate_limit_is_parsed_strictly() {
    for bad in [" 5/s", "5/s ", "+5/s", "05/s", "5/ s", "5 /s", "5/S"] {
        let err = config_error(&format!("rate_limit = {bad:?}"));
        assert!(
            err.contains("pipeline \"x\"") && err.contains(&format!("rate_limit {bad:?}")),
            "{bad:?}: {err}"
        );
    }
    for good in ["5/s", "10/min", "3600/h"] {
        config(&format!(
            "[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"p.wasm\"\nrate_limit = {good:?}\n"
        ))
        .unwrap_or_else(|e| panic!("{good:?} refused: {e:#}"));
    }
}

#[test]
fn http_rule_ports_with_a_sign_or_leading_zero_are_refused() {
    for bad in [
        "http://127.0.0.1:+6310",
        "http://127.0.0.1:06310",
        "https://[::1]:+443",
        "https://example.com:0443",
    ] {
        let err = config_error(&format!("[pipeline.http]\nallowed_hosts = [{bad:?}]"));
        assert!(
            err.contains("http.allowed_hosts") && err.contains("1 to 65535"),
            "{bad:?}: {err}"
        );
    }
}
