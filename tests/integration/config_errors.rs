//! Bad configuration and bad plugin files fail early with errors that say what
//! and where.

use std::path::PathBuf;

use warren_tests::{config, plugin, unique};

use crate::pipeline_at;

fn start_error(plugin: &std::path::Path) -> String {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cfg = config(&pipeline_at("bad", &unique("bad"), plugin, "")).expect("config parses");
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
