//! The `warren` binary's `check` and `invoke` commands, as users run them
//! (no broker needed). Plugins come from `scripts/build-plugins.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var("WARREN_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist"));
    dir.join(format!("{name}.wasm"))
}

fn warren(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .env(
            "WARREN_CACHE_DIR",
            std::env::temp_dir().join("warren-cli-test-cache"),
        )
        .output()
        .expect("running warren")
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
