//! The `warren` binary as users run it: `check` and `invoke` (no broker
//! needed), and how `run` answers signals (against the test broker from
//! `WARREN_TEST_BROKER_URL`, as `scripts/test.sh` starts it). Plugins come from
//! `scripts/build-plugins.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/src/names.rs"]
mod names;

// The outbound-HTTP tests' server; these tests use only part of it.
#[allow(dead_code)]
#[path = "../../tests/src/http_server.rs"]
mod http_server;

use names::{broker_url, plugin, unique};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn warren(args: &[&str]) -> Output {
    warren_with(args, &[])
}

/// Run warren with extra environment variables.
fn warren_with(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.args(args)
        .env(
            "WARREN_CACHE_DIR",
            std::env::temp_dir().join("warren-cli-test-cache"),
        )
        .env_remove("WARREN_BROKER_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running warren")
}

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("warren.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_a_valid_config_and_compiles_its_plugins() {
    let cfg = temp_config(
        "ok",
        &format!(
            "[[pipeline]]\nname = \"fib\"\nqueue = \"rpc_queue\"\nplugin = {:?}\n",
            plugin("fib").display().to_string()
        ),
    );
    let out = warren(&["check", "--config", cfg.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("pipeline fib") && stdout.contains("configuration valid"),
        "{stdout}"
    );
}

#[test]
fn check_rejects_bad_configs_with_a_clear_message() {
    let cfg = temp_config(
        "typo",
        "[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"p.wasm\"\nconcurency = 2\n",
    );
    let out = warren(&["check", "--config", cfg.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("concurency") && stderr.contains("warren.toml"),
        "{stderr}"
    );

    let cfg = temp_config(
        "missing",
        "[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"nowhere.wasm\"\n",
    );
    let out = warren(&["check", "--config", cfg.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("nowhere.wasm") && stderr.contains("pipeline \"x\""),
        "{stderr}"
    );

    let out = warren(&["check", "--config", "/nonexistent/warren.toml"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("reading config file /nonexistent/warren.toml")
    );
}

#[test]
fn invoke_prints_the_outcome_as_json() {
    let out = warren(&[
        "invoke",
        plugin("fib").to_str().unwrap(),
        "--body",
        "30",
        "--reply-to",
        "me",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["outcome"], "reply");
    assert_eq!(json["reply"]["body"]["text"], "832040");

    let out = warren(&[
        "invoke",
        plugin("probe").to_str().unwrap(),
        "--body",
        "config colour",
        "--config",
        "colour=teal",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["reply"]["body"]["text"], "teal");

    let out = warren(&["invoke", plugin("trap").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "a failed call exits 2");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["failure"]["kind"], "trap");

    let out = warren(&[
        "invoke",
        plugin("spin").to_str().unwrap(),
        "--timeout-ms",
        "50",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["failure"]["kind"], "timeout");
}

/// `[[pipeline]]` `x` on queue `q`, with `extra` appended inside it.
#[test]
fn dlq_purge_needs_yes_and_touches_nothing_without_it() {
    // The refusal comes before the config is even read: nothing to connect to.
    let out = warren(&[
        "dlq",
        "purge",
        "--config",
        "/nonexistent/warren.toml",
        "--pipeline",
        "p",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--yes") && stderr.contains("--dry-run"),
        "{stderr}"
    );
}

#[test]
fn dlq_filters_that_would_select_more_than_meant_are_refused() {
    // Refused while parsing the arguments: no config read, no broker asked.
    for args in [
        &["--reason", ""][..],
        &["--reason", "  "],
        &["--version", "0"],
        &["--version", "abc"],
        &["--version", "xyz1"],
    ] {
        for command in [
            &["dlq", "purge", "--yes"][..],
            &["dlq", "purge", "--dry-run"],
            &["dlq", "redrive"],
            &["dlq", "redrive", "--dry-run"],
            &["dlq", "show"],
        ] {
            let mut all = command.to_vec();
            all.extend(["--config", "/nonexistent/warren.toml", "--pipeline", "p"]);
            all.extend(args);
            let out = warren(&all);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{all:?}: {stderr}");
            assert!(stderr.contains(args[0]), "{all:?}: {stderr}");
            assert!(
                !stderr.contains("nonexistent"),
                "{all:?} read the config: {stderr}"
            );
        }
    }
}

fn pipeline_x(extra: &str) -> String {
    format!("[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"p.wasm\"\n{extra}\n")
}

#[test]
fn check_rejects_what_run_cannot_serve_naming_the_field() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "concurrency-huge",
            pipeline_x("concurrency = 100000"),
            vec!["pipeline \"x\"", "concurrency must be between 1 and 1024"],
        ),
        (
            "concurrency-max",
            pipeline_x("concurrency = 18446744073709551615"),
            vec!["pipeline \"x\"", "concurrency"],
        ),
        (
            "timeout",
            pipeline_x("[pipeline.limits]\ntimeout_ms = 18446744073709551615"),
            vec!["pipeline \"x\"", "limits.timeout_ms"],
        ),
        (
            "max-delay",
            pipeline_x("[pipeline.retry]\nmax_delay_ms = 4294967296"),
            vec!["pipeline \"x\"", "retry.max_delay_ms"],
        ),
        (
            "output-default-exchange",
            pipeline_x("[[pipeline.output]]\nexchange = \"\""),
            vec![
                "pipeline \"x\"",
                "an output needs an exchange, or queues = [...]",
            ],
        ),
        (
            "output-to-a-dlq",
            pipeline_x("[[pipeline.output]]\nqueues = [\"q.dlq\"]"),
            vec![
                "pipeline \"x\"",
                "output queue \"q.dlq\"",
                "a dead-letter queue (<queue>.dlq), which warren manages",
            ],
        ),
        (
            "exchange-types",
            format!(
                "{}[[pipeline]]\nname = \"y\"\nqueue = \"q2\"\nplugin = \"p.wasm\"\n\
                 [[pipeline.binding]]\nexchange = \"events\"\ntype = \"fanout\"\n",
                pipeline_x("[[pipeline.output]]\nexchange = \"events\"\ntype = \"topic\"")
            ),
            vec!["exchange \"events\"", "pipelines \"x\" and \"y\""],
        ),
        (
            "queue-is-a-dlq",
            format!(
                "{}[[pipeline]]\nname = \"y\"\nqueue = \"q.dlq\"\nplugin = \"p.wasm\"\n",
                pipeline_x("")
            ),
            vec!["\"q.dlq\"", "dead-letter queue of pipeline \"x\""],
        ),
        (
            "empty-plugin",
            "[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"\"\n".to_string(),
            vec!["pipeline \"x\": plugin must not be empty"],
        ),
    ];
    for (name, toml, needles) in cases {
        let cfg = temp_config(name, &toml);
        let out = warren(&["check", "--config", cfg.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{name}: no {needle:?} in {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
}

#[test]
fn an_invalid_broker_url_from_the_environment_is_named_as_such() {
    let cfg = temp_config("env-url", &pipeline_x(""));
    let out = warren_with(
        &["check", "--config", cfg.to_str().unwrap()],
        &[("WARREN_BROKER_URL", Path::new("nonsense"))],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("WARREN_BROKER_URL is not an AMQP URL"),
        "{stderr}"
    );
    assert!(!stderr.contains("broker.url"), "{stderr}");
}

#[test]
fn a_memory_limit_below_the_plugins_initial_memory_is_named_and_spares_the_cache() {
    let cache =
        std::env::temp_dir().join(format!("warren-cli-{}-memory-cache", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let check = |mib: u32| {
        let cfg = temp_config(
            &format!("memory-{mib}"),
            &format!(
                "[[pipeline]]\nname = \"fib\"\nqueue = \"q\"\nplugin = {:?}\n\
                 [pipeline.limits]\nmemory_mib = {mib}\n",
                plugin("fib").display().to_string()
            ),
        );
        warren_with(
            &["check", "--config", cfg.to_str().unwrap()],
            &[("WARREN_CACHE_DIR", &cache)],
        )
    };
    let out = check(64);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cache miss"), "{stdout}");

    // A Rust plugin's memory starts at 17 pages (1.06 MiB).
    let out = check(1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("pipeline \"fib\"")
            && stderr.contains("limits.memory_mib = 1 is too small")
            && stderr.contains("set at least 2"),
        "{stderr}"
    );

    // The compiled entry stored above is still there and still used.
    let out = check(2);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cache hit"), "{stdout}");
}

// ---- signals: `warren run` against the test broker ----------------------------

/// A `warren run` process whose log (stderr) is read line by line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(config: &Path) -> Self {
        Self::start_with(config, &[])
    }

    /// Start with extra environment variables (they override the defaults).
    fn start_with(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_warren"));
        child
            .args(["run", "--config", config.to_str().unwrap()])
            .env(
                "WARREN_CACHE_DIR",
                std::env::temp_dir().join("warren-cli-test-cache"),
            )
            .env_remove("WARREN_BROKER_URL")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        for (k, v) in env {
            child.env(k, v);
        }
        let mut child = child
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting warren run");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first log line containing `needle`, waiting up to `within`.
    fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line.clone());
                    if hit {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {needle:?} within {within:?}; the log:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("sh")
            .args(["-c", &format!("kill -{name} {}", self.child.id())])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The exit status, waiting up to `within`.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for warren") {
                return status;
            }
            if Instant::now() >= deadline {
                while let Ok(line) = self.lines.try_recv() {
                    self.seen.push(line);
                }
                panic!(
                    "warren still running after {within:?}; the log:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Write `bytes` to `path` the way deploy tools do: a temporary file renamed over it.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn sighup_rechecks_plugin_files_and_does_not_stop_warren() {
    let dir = std::env::temp_dir().join(unique("sighup"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tagger.wasm");
    replace_file(&file, &std::fs::read(plugin("tag_a")).unwrap());
    // A debounce far longer than the test: only SIGHUP can make warren look
    // at the new file in time.
    let queue = unique("sighup");
    let cfg = temp_config(
        "sighup",
        &format!(
            "[broker]\nurl = {:?}\nreconnect_delay_ms = 100\n[ops]\nlisten = \"\"\n\
             [runtime]\nreload_debounce_ms = 600000\n\
             [[pipeline]]\nname = \"tagger\"\nqueue = {:?}\nqueue_type = \"classic\"\n\
             plugin = {:?}\n",
            broker_url(),
            queue,
            file.display().to_string()
        ),
    );
    let mut warren = Running::start(&cfg);
    warren.wait_for("plugin loaded", Duration::from_secs(60));
    replace_file(&file, &std::fs::read(plugin("tag_b")).unwrap());
    warren.signal("HUP");
    warren.wait_for(
        "SIGHUP received; plugin files are re-checked",
        Duration::from_secs(10),
    );
    let line = warren.wait_for("plugin file re-checked", Duration::from_secs(60));
    assert!(
        line.contains("pipeline=tagger") && line.contains("result=reloaded"),
        "{line}"
    );
    // Still running, and still stops cleanly.
    assert!(
        warren.child.try_wait().unwrap().is_none(),
        "SIGHUP stopped warren"
    );
    warren.signal("TERM");
    let status = warren.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", warren.seen.join("\n"));
    warren.wait_for("stopped", Duration::from_secs(1));
    delete_queues(&queue);
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET path` on the ops endpoint, if it answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once_and_the_broker_redelivers() {
    let url = broker_url();
    let queue = unique("second-signal");
    let port = free_port();
    // The message spins until its two-minute timeout, and the drain would wait
    // as long: only the second signal can end it within the test's deadline.
    let cfg = temp_config(
        "second-signal",
        &format!(
            "[broker]\nurl = {url:?}\nreconnect_delay_ms = 100\n\
             [ops]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_ms = 120000\n\
             [[pipeline]]\nname = \"spinner\"\nqueue = {queue:?}\nqueue_type = \"classic\"\n\
             plugin = {:?}\nconcurrency = 1\n\
             [pipeline.retry]\nmax_attempts = 1\ninitial_delay_ms = 1000\nmax_delay_ms = 1000\n\
             [pipeline.limits]\ntimeout_ms = 120000\n",
            plugin("probe").display().to_string()
        ),
    );
    let mut warren = Running::start(&cfg);
    warren.wait_for("consuming pipeline=spinner", Duration::from_secs(60));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let channel = rt.block_on(async {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .expect("connecting to the test broker");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .unwrap();
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                b"spin",
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        (conn, channel)
    });

    let in_flight = "warren_in_flight{pipeline=\"spinner\"} 1";
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(port, "/metrics").is_some_and(|m| m.contains(in_flight)) {
        assert!(
            Instant::now() < deadline,
            "the message never got in flight; the log:\n{}",
            warren.seen.join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    warren.signal("TERM");
    warren.wait_for("SIGTERM received; shutting down", Duration::from_secs(10));
    warren.signal("INT");
    let status = warren.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{}", warren.seen.join("\n"));
    let line = warren.wait_for("second signal", Duration::from_secs(1));
    assert!(
        line.contains("exiting without waiting for in-flight messages, the broker redelivers them"),
        "{line}"
    );

    // The message was never acknowledged, so the broker hands it out again.
    let (_conn, channel) = channel;
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let got = loop {
            let got = channel
                .basic_get(
                    queue.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap();
            if let Some(m) = got {
                break m;
            }
            assert!(
                Instant::now() < deadline,
                "the message did not come back to {queue}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        assert_eq!(got.delivery.data, b"spin");
        assert!(got.delivery.redelivered);
        for q in [
            queue.clone(),
            format!("{queue}.dlq"),
            format!("{queue}.retry.1000"),
        ] {
            let _ = channel
                .queue_delete(
                    q.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    });
}

/// A pipeline of the probe plugin whose config `token` is the secret in
/// environment variable `var`.
fn secret_config(name: &str, var: &str, queue: &str, ops: &str) -> PathBuf {
    temp_config(
        name,
        &format!(
            "[broker]\nurl = {:?}\nreconnect_delay_ms = 100\n[ops]\nlisten = {ops:?}\n\
             [[pipeline]]\nname = \"vault\"\nqueue = {queue:?}\nqueue_type = \"classic\"\n\
             plugin = {:?}\n[pipeline.retry]\nmax_attempts = 1\n\
             [pipeline.config]\ntoken = {{ env = {var:?} }}\nplain = \"visible\"\n",
            broker_url(),
            plugin("probe").display().to_string()
        ),
    )
}

#[test]
fn check_needs_every_secret_and_never_shows_one() {
    let var = "WARREN_CLI_TEST_SECRET_TOKEN";
    let secret = format!("s3cr3t-{}", unique("check"));
    let cfg = secret_config("secret-check", var, &unique("secret-check"), "");
    let run = |value: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
        cmd.args(["check", "--config", cfg.to_str().unwrap()])
            .env(
                "WARREN_CACHE_DIR",
                std::env::temp_dir().join("warren-cli-test-cache"),
            )
            .env_remove("WARREN_BROKER_URL")
            .env("RUST_LOG", "trace");
        match value {
            Some(v) => cmd.env(var, v),
            None => cmd.env_remove(var),
        };
        let out = cmd.output().expect("running warren check");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, all)
    };
    let (status, all) = run(Some(&secret));
    assert!(status.success(), "{all}");
    assert!(all.contains("configuration valid"), "{all}");
    assert!(!all.contains(&secret), "the secret was shown:\n{all}");

    let (status, all) = run(None);
    assert!(!status.success(), "{all}");
    assert!(
        all.contains("pipeline \"vault\"")
            && all.contains("config.token")
            && all.contains(&format!("environment variable {var} is not set")),
        "{all}"
    );
    let (status, all) = run(Some(""));
    assert!(!status.success() && all.contains("is empty"), "{all}");
}

#[test]
fn run_keeps_secrets_out_of_logs_and_the_ops_endpoint() {
    let var = "WARREN_CLI_TEST_SECRET_TOKEN";
    let secret = format!("s3cr3t-{}", unique("run"));
    let queue = unique("secret-run");
    let port = free_port();
    let cfg = secret_config("secret-run", var, &queue, &format!("127.0.0.1:{port}"));
    // Debug logging: every line warren can write about a message.
    let mut warren =
        Running::start_with(&cfg, &[(var, &secret), ("RUST_LOG", "info,warren=debug")]);
    warren.wait_for("consuming pipeline=vault", Duration::from_secs(60));

    // The plugin reads the secret (and answers with it, as a plugin may);
    // the other messages fail in every way warren logs.
    let answer = publish(
        &queue,
        &[
            ("config token", true),
            ("config token", false),
            ("trap", false),
            ("retry again", false),
        ],
    );
    assert_eq!(answer, secret, "the plugin gets the secret's value");

    // All four settled: one reply, three dead letters.
    let settled = "warren_messages_total{pipeline=\"vault\",outcome=\"dead_letter\"} 3";
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let m = http_get(port, "/metrics").unwrap_or_default();
        if m.contains(settled) {
            break m;
        }
        assert!(Instant::now() < deadline, "not settled:\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let ready = http_get(port, "/healthz/ready").unwrap_or_default();
    assert!(ready.contains("vault"), "{ready}");
    for (what, text) in [("/metrics", &metrics), ("/healthz/ready", &ready)] {
        assert!(!text.contains(&secret), "the secret is in {what}:\n{text}");
    }

    warren.signal("TERM");
    assert_eq!(warren.wait_exit(Duration::from_secs(30)).code(), Some(0));
    // Everything warren wrote, to the last line.
    while let Ok(line) = warren.lines.recv_timeout(Duration::from_secs(5)) {
        warren.seen.push(line);
    }
    let log = warren.seen.join("\n");
    assert!(
        log.contains("plugin trapped") || log.contains("trap"),
        "{log}"
    );
    assert!(!log.contains(&secret), "the secret is in the log:\n{log}");
    delete_queues(&queue);
}

/// Publish `body` to `queue` asking for a reply, and return the reply's
/// body. The reply queue is deleted again.
fn ask(queue: &str, body: &str) -> String {
    publish(queue, &[(body, true)])
}

/// Publish `messages` to `queue` in order, with confirms, each asking for a
/// reply to `<queue>.replies` when its flag says so; return the first reply's
/// body (empty when none was asked for). The reply queue is deleted again.
fn publish(queue: &str, messages: &[(&str, bool)]) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let replies = format!("{queue}.replies");
    rt.block_on(async {
        let conn =
            lapin::Connection::connect(&broker_url(), lapin::ConnectionProperties::default())
                .await
                .expect("connecting to the test broker");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .unwrap();
        channel
            .queue_declare(
                replies.as_str().into(),
                lapin::options::QueueDeclareOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        for (body, reply) in messages {
            let mut props = lapin::BasicProperties::default();
            if *reply {
                props = props.with_reply_to(replies.as_str().into());
            }
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    lapin::options::BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        }
        let mut answer = String::new();
        if messages.iter().any(|(_, reply)| *reply) {
            let deadline = Instant::now() + Duration::from_secs(30);
            answer = loop {
                let got = channel
                    .basic_get(
                        replies.as_str().into(),
                        lapin::options::BasicGetOptions { no_ack: true },
                    )
                    .await
                    .unwrap();
                if let Some(m) = got {
                    break String::from_utf8_lossy(&m.delivery.data).into_owned();
                }
                assert!(Instant::now() < deadline, "no reply to {messages:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
        }
        let _ = channel
            .queue_delete(
                replies.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
        answer
    })
}

/// Delete the queues warren made for a pipeline on `queue` with the default
/// retry delays (queue, DLQ, every retry tier), and its `.replies` queue.
fn delete_queues(queue: &str) {
    let tiers = warren::retry::RetryTiers::new(&warren::retry::RetryConfig::default());
    let mut names = vec![
        queue.to_string(),
        format!("{queue}.dlq"),
        format!("{queue}.replies"),
    ];
    names.extend(
        tiers
            .delays_ms()
            .iter()
            .map(|ms| warren::retry::tier_queue(queue, *ms)),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn =
            lapin::Connection::connect(&broker_url(), lapin::ConnectionProperties::default())
                .await
                .expect("connecting to the test broker");
        let channel = conn.create_channel().await.unwrap();
        for q in names {
            let _ = channel
                .queue_delete(
                    q.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    });
}

/// A probe pipeline `name` on `queue` allowed to call `server`, with the
/// secret in `var` as config `token`.
fn http_config(name: &str, var: &str, queue: &str, server: &http_server::HttpServer) -> PathBuf {
    temp_config(
        name,
        &format!(
            "[broker]\nurl = {:?}\nreconnect_delay_ms = 100\n[ops]\nlisten = \"\"\n\
             [[pipeline]]\nname = \"vault\"\nqueue = {queue:?}\nqueue_type = \"classic\"\n\
             plugin = {:?}\n[pipeline.retry]\nmax_attempts = 1\n\
             [pipeline.config]\ntoken = {{ env = {var:?} }}\n\
             [pipeline.http]\nallowed_hosts = [{:?}]\n",
            broker_url(),
            plugin("probe").display().to_string(),
            server.url("http", "")
        ),
    )
}

/// Stop warren and return everything it logged, to the last line.
fn stop_and_collect(mut warren: Running) -> String {
    warren.signal("TERM");
    assert_eq!(warren.wait_exit(Duration::from_secs(30)).code(), Some(0));
    while let Ok(line) = warren.lines.recv_timeout(Duration::from_secs(5)) {
        warren.seen.push(line);
    }
    warren.seen.join("\n")
}

#[test]
fn a_secret_a_plugin_puts_in_a_request_path_is_not_logged_even_at_trace() {
    let var = "WARREN_CLI_TEST_TRACE_SECRET";
    let secret = format!("s3cr3t-{}", unique("trace"));
    let server = http_server::HttpServer::start(|_| http_server::Reply::ok("fine")).unwrap();
    let queue = unique("secret-trace");
    let cfg = http_config("secret-trace", var, &queue, &server);
    // Compiled (and cached) first: a compile logged at trace takes a minute.
    let out = warren_with(
        &["check", "--config", cfg.to_str().unwrap()],
        &[(var, Path::new(&secret))],
    );
    assert!(out.status.success(), "{out:?}");
    // Everything every library logs, wasmtime's WIT-call traces included.
    let mut warren = Running::start_with(&cfg, &[(var, &secret), ("RUST_LOG", "trace")]);
    warren.wait_for("consuming pipeline=vault", Duration::from_secs(60));

    let answer = ask(
        &queue,
        &format!("http-config token {}", server.url("http", "/ok?t=")),
    );
    assert!(answer.contains("\"status\":200"), "{answer}");
    // The plugin did put the secret in the request line.
    let paths: Vec<String> = server.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, [format!("/ok?t={secret}")]);

    let log = stop_and_collect(warren);
    delete_queues(&queue);
    assert!(log.contains(" TRACE "), "not a trace log:\n{log}");
    assert!(
        !log.contains(&secret),
        "the secret is in the log:\n{}",
        log.lines()
            .filter(|l| l.contains(&secret))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_response_that_stalls_past_its_timeout_is_logged_with_its_pipeline() {
    let var = "WARREN_CLI_TEST_STALL_SECRET";
    let server = http_server::HttpServer::start(|_| http_server::Reply::Stall(1000)).unwrap();
    let queue = unique("http-stall");
    // The request's own timeout ends it (not the message's): the plugin gets
    // an error from the body, and the connection is dropped at that moment.
    let cfg = http_config("http-stall", var, &queue, &server);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}timeout_ms = 500\n")).unwrap();
    let mut warren = Running::start_with(
        &cfg,
        &[(var, "unused-value"), ("RUST_LOG", "info,warren=debug")],
    );
    warren.wait_for("consuming pipeline=vault", Duration::from_secs(60));
    let answer = ask(
        &queue,
        &format!("http GET {}", server.url("http", "/stall")),
    );
    assert!(answer.contains("\"error\""), "{answer}");
    // warren's own line about it names the pipeline.
    let line = warren.wait_for(
        "the connection ended before the response did",
        Duration::from_secs(10),
    );
    assert!(line.contains("pipeline=vault"), "{line}");
    let log = stop_and_collect(warren);
    delete_queues(&queue);
    // And no line (wasmtime's `dropping error ...` was one) goes without it.
    for line in log
        .lines()
        .filter(|l| l.contains("wasmtime") || l.contains("HTTP"))
    {
        assert!(
            line.contains("pipeline=vault"),
            "a line without its pipeline: {line}"
        );
    }
}
