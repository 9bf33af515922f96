//! Rust plugins built for `wasm32-unknown-unknown` (`noop_bare`, `fib_bare`,
//! `trap_bare`, from the same crates as `noop`, `fib` and `trap`): components
//! that import nothing from WASI. They serve messages like their WASI builds,
//! and a panic still reaches the dead-letter reason through the SDK's hook.
//!
//! `scripts/build-plugins.sh` builds them only when rustup can add the
//! `wasm32-unknown-unknown` target (Debian's fallback toolchain has no std for
//! it, and rustup's downloads are not a package registry). A test therefore
//! fails when the target is installed but the plugin is missing, and is skipped
//! with a note when the target could not be installed.

use std::path::PathBuf;
use std::time::Duration;

use warren::disposition::Disposition;
use warren_tests::{
    Client, RpcClient, built_plugin, config, eventually, header, plugin, start, text, unique,
};

use crate::{FAST_RETRY, pipeline_at};

const WAIT: Duration = Duration::from_secs(30);

fn bare_plugin(name: &str) -> Option<PathBuf> {
    let why = match built_plugin(name) {
        Ok(path) => return Some(path),
        Err(why) => why,
    };
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let installed = std::process::Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(plugins)
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-unknown-unknown")
        });
    if installed {
        panic!("{why}, although rustup has the wasm32-unknown-unknown target");
    }
    eprintln!("note: skipping this test: {why}; rustup has no wasm32-unknown-unknown target");
    None
}

/// The names of a component's imports (interfaces, as `ns:pkg/iface@version`).
fn imports(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let engine = wasmtime::Engine::default();
    let component = wasmtime::component::Component::from_file(&engine, path)?;
    Ok(component
        .component_type()
        .imports(&engine)
        .map(|(name, _)| name.to_string())
        .collect())
}

#[test]
fn bare_builds_import_nothing_from_wasi() -> anyhow::Result<()> {
    let Some(noop) = bare_plugin("noop_bare") else {
        return Ok(());
    };
    let Some(fib) = bare_plugin("fib_bare") else {
        return Ok(());
    };
    // The WASI build of the same crate, for contrast: std pulls in stdio,
    // environment and exit even for a plugin that uses none of them.
    assert!(
        imports(&plugin("noop"))?
            .iter()
            .any(|i| i.starts_with("wasi:")),
        "the wasm32-wasip2 no-op should import WASI, or this check proves nothing"
    );
    // noop turns off the SDK's panic-log feature, so it imports no function at
    // all: only the interface that defines the message types.
    assert_eq!(imports(&noop)?, ["warren:plugin/types@0.1.1"]);
    let fib_imports = imports(&fib)?;
    assert!(
        !fib_imports.iter().any(|i| i.starts_with("wasi:")),
        "{fib_imports:?}"
    );
    assert!(
        fib_imports
            .iter()
            .any(|i| i.starts_with("warren:plugin/host")),
        "fib logs through warren's host interface: {fib_imports:?}"
    );
    Ok(())
}

#[tokio::test]
async fn bare_plugins_ack_and_answer_rpc() -> anyhow::Result<()> {
    let (Some(noop), Some(fib)) = (bare_plugin("noop_bare"), bare_plugin("fib_bare")) else {
        return Ok(());
    };
    let (qn, qf) = (unique("bare-noop"), unique("bare-fib"));
    let pipelines = format!(
        "{}\n{}",
        pipeline_at("noop", &qn, &noop, ""),
        pipeline_at("fib", &qf, &fib, "")
    );
    let warren = start(config(&pipelines)?).await?;
    let client = Client::connect().await?;
    // Bodies larger than the SDK's arena in the initial memory make the
    // allocator grow the memory; they must work the same.
    let big = vec![b'x'; 300 * 1024];
    for body in [&b"small"[..], &big] {
        client.send(&qn, body).await?;
    }
    let m = warren.metrics().pipeline("noop").expect("pipeline metrics");
    eventually(WAIT, || m.outcome_count(Disposition::Ack) == 2).await?;

    let mut rpc = RpcClient::connect().await?;
    for (n, want) in [("10", "55"), ("90", "2880067194370816120")] {
        let r = rpc.call(&qf, n.as_bytes(), WAIT).await?;
        assert_eq!(text(&r), want, "fib({n})");
    }
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_panic_in_a_bare_plugin_is_its_dead_letter_reason() -> anyhow::Result<()> {
    let Some(trap) = bare_plugin("trap_bare") else {
        return Ok(());
    };
    let q = unique("bare-trap");
    let warren = start(config(&pipeline_at("trap", &q, &trap, FAST_RETRY))?).await?;
    let client = Client::connect().await?;
    client.send(&q, b"anything").await?;
    let d = client.take_one(&format!("{q}.dlq"), WAIT).await?;
    let reason = header(&d, "x-warren-reason").unwrap_or_default();
    assert!(reason.contains("plugin trapped"), "{reason}");
    assert!(
        reason.contains("panicked: trap fixture: panicking on purpose"),
        "the panic's message, logged by the SDK's hook, is in the reason: {reason}"
    );
    warren.shutdown().await;
    Ok(())
}
