//! Hot reload under load, and every way a plugin file can change or break.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use warren::disposition::Disposition;
use warren_tests::{
    Client, config, eventually, header, language_plugin, plugin, start, text, unique,
};

use crate::pipeline_at;

const WAIT: Duration = Duration::from_secs(20);

/// A private directory with a plugin file the test may replace.
fn plugin_dir(initial: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = std::env::temp_dir().join(unique("reload"));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("handler.wasm");
    std::fs::copy(plugin(initial), &file)?;
    Ok((dir, file))
}

fn digest_version(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(warren::plugins::digest_of(&bytes)[..12].to_string())
}

/// Replacement styles deploy tools use.
#[derive(Debug, Clone, Copy)]
enum Style {
    /// Truncate and write the file where it is.
    InPlace,
    /// Write a temporary file next to it and rename it over.
    RenameOver,
    /// Point a symlink at a file elsewhere, swapped atomically by rename.
    Symlink,
}

fn replace(style: Style, target: &Path, source: &Path, stash: &Path) -> anyhow::Result<()> {
    let dir = target.parent().expect("plugin dir");
    match style {
        Style::InPlace => {
            // Writing through a symlink would modify the stashed version instead.
            if target.is_symlink() {
                std::fs::remove_file(target)?;
            }
            std::fs::write(target, std::fs::read(source)?)?;
        }
        Style::RenameOver => {
            let tmp = dir.join(".handler.wasm.tmp");
            std::fs::copy(source, &tmp)?;
            std::fs::rename(&tmp, target)?;
        }
        Style::Symlink => {
            let name = format!("{}.wasm", unique("v"));
            let versioned = stash.join(name);
            std::fs::copy(source, &versioned)?;
            let link = dir.join(".handler.link.tmp");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&versioned, &link)?;
            std::fs::rename(&link, target)?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let (dir, file) = plugin_dir("tag_a")?;
    let stash = dir.join("versions");
    std::fs::create_dir_all(&stash)?;
    let q = unique("reload-load");
    let out = format!("{q}.out");
    let warren = start(config(&pipeline_at(
        "reload",
        &q,
        &file,
        "concurrency = 4\nprefetch = 64\n",
    ))?)
    .await?;
    let client = Client::connect().await?;
    client.declare_queue(&out).await?;
    let m = warren
        .metrics()
        .pipeline("reload")
        .expect("pipeline metrics");

    let n = 3000usize;
    let done = Arc::new(AtomicBool::new(false));
    let producer = {
        let q = q.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let client = Client::connect().await?;
            for i in 0..n {
                client.send(&q, format!("id-{i}").as_bytes()).await?;
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            done.store(true, Ordering::Relaxed);
            anyhow::Ok(())
        })
    };

    let versions = [plugin("tag_b"), plugin("tag_a")];
    let styles = [Style::RenameOver, Style::InPlace, Style::Symlink];
    let mut swaps = 0;
    while swaps < 24 {
        let source = &versions[swaps % 2];
        let want = digest_version(source)?;
        replace(styles[swaps % 3], &file, source, &stash)?;
        eventually(WAIT, || m.plugin.version() == want)
            .await
            .map_err(|e| {
                anyhow::anyhow!("swap {swaps} ({:?}) not picked up: {e}", styles[swaps % 3])
            })?;
        swaps += 1;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    producer.await??;
    assert!(done.load(Ordering::Relaxed));

    let got = client.take(&out, n, Duration::from_secs(60)).await?;
    let mut ids = HashSet::new();
    let mut tags: HashMap<String, usize> = HashMap::new();
    for d in &got {
        assert!(ids.insert(text(d)), "duplicate output {}", text(d));
        *tags
            .entry(header(d, "x-tag").unwrap_or_default())
            .or_default() += 1;
    }
    assert_eq!(ids.len(), n);
    assert!(
        tags.get("a").copied().unwrap_or(0) > 0 && tags.get("b").copied().unwrap_or(0) > 0,
        "{tags:?}"
    );
    client
        .expect_empty(&out, Duration::from_millis(300))
        .await?;
    assert_eq!(client.depth(&q).await?, 0, "nothing left unacked");
    assert_eq!(
        client.depth(&format!("{q}.dlq")).await?,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(m.requeued.load(Ordering::Relaxed), 0);
    assert!(
        m.plugin.reload_count() >= 24,
        "reloads: {}",
        m.plugin.reload_count()
    );
    assert_eq!(m.plugin.reload_failure_count(), 0);
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn broken_truncated_and_deleted_files_keep_the_old_version() -> anyhow::Result<()> {
    let (dir, file) = plugin_dir("tag_a")?;
    let q = unique("reload-broken");
    let out = format!("{q}.out");
    let warren = start(config(&pipeline_at("broken", &q, &file, ""))?).await?;
    let client = Client::connect().await?;
    client.declare_queue(&out).await?;
    let m = warren
        .metrics()
        .pipeline("broken")
        .expect("pipeline metrics");
    let version_a = digest_version(&plugin("tag_a"))?;
    let version_b = digest_version(&plugin("tag_b"))?;
    assert_eq!(m.plugin.version(), version_a);

    // Not a component at all: reported, old version serves.
    std::fs::write(&file, b"garbage")?;
    eventually(WAIT, || m.plugin.reload_failure_count() == 1).await?;
    assert!(
        warren
            .metrics()
            .readiness_json()
            .to_string()
            .contains("not a WebAssembly component")
    );
    client.send(&q, b"one").await?;
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(header(&d, "x-tag").as_deref(), Some("a"));

    // A slow writer pausing longer than the debounce: the half-written file is
    // never attempted; the complete one is loaded after the writer closes it.
    let bytes = std::fs::read(plugin("tag_b"))?;
    {
        let mut f = std::fs::File::create(&file)?;
        f.write_all(&bytes[..bytes.len() / 2])?;
        f.flush()?;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            m.plugin.version(),
            version_a,
            "half a file must not be loaded"
        );
        f.write_all(&bytes[bytes.len() / 2..])?;
    }
    eventually(WAIT, || m.plugin.version() == version_b).await?;
    assert_eq!(
        m.plugin.reload_failure_count(),
        1,
        "the truncated file was never tried"
    );

    // Deleted: keeps serving with a warning, comes back when the file does.
    std::fs::remove_file(&file)?;
    eventually(WAIT, || m.plugin.missing.load(Ordering::Relaxed)).await?;
    client.send(&q, b"two").await?;
    assert_eq!(
        header(&client.take_one(&out, WAIT).await?, "x-tag").as_deref(),
        Some("b")
    );
    std::fs::copy(plugin("tag_a"), &file)?;
    eventually(WAIT, || m.plugin.version() == version_a).await?;
    assert!(!m.plugin.missing.load(Ordering::Relaxed));
    client.send(&q, b"three").await?;
    assert_eq!(
        header(&client.take_one(&out, WAIT).await?, "x-tag").as_deref(),
        Some("a")
    );
    // Counted once the broker's confirm is in, which may be after the
    // effect itself has reached the test.
    eventually(WAIT, || m.outcome_count(Disposition::Publish) == 3).await?;
    warren.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test]
async fn the_compiled_cache_is_used_on_restart_and_recovers_from_corruption() -> anyhow::Result<()>
{
    let cache = std::env::temp_dir().join(unique("cache"));
    let q = unique("cache");
    let toml = format!(
        "[runtime]\ncache_dir = {:?}\n{}",
        cache.display().to_string(),
        crate::pipeline("cached", &q, "probe", "reload = false\n")
    );
    let source = |w: &warren::Running, label: &str| {
        w.metrics()
            .pipeline("cached")
            .map_or(0, |m| m.plugin.cache_count(label))
    };

    let first = start(config(&toml)?).await?;
    assert_eq!(source(&first, "miss"), 1, "cold cache compiles");
    first.shutdown().await;

    let second = start(config(&toml)?).await?;
    assert_eq!(source(&second, "hit"), 1, "restart loads from the cache");
    second.shutdown().await;

    // Corrupt the compiled code, keeping its checksum file: detected, rebuilt.
    let entry = std::fs::read_dir(&cache)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("a cache entry");
    let mut code = std::fs::read(&entry)?;
    let mid = code.len() / 2;
    code[mid] ^= 0xff;
    std::fs::write(&entry, code)?;
    let third = start(config(&toml)?).await?;
    assert_eq!(source(&third, "recovered"), 1);
    let client = Client::connect().await?;
    let mut rpc = warren_tests::RpcClient::connect().await?;
    assert_eq!(
        text(&rpc.call(&q, b"reply still works", WAIT).await?),
        "still works"
    );
    drop(client);
    third.shutdown().await;

    let fourth = start(config(&toml)?).await?;
    assert_eq!(source(&fourth, "hit"), 1, "the rebuilt entry is good");
    fourth.shutdown().await;
    let _ = std::fs::remove_dir_all(cache);
    Ok(())
}

/// A fresh directory of this test's own.
fn test_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The pipeline's entry in `/healthz/ready`.
fn readiness(warren: &warren::Running, pipeline: &str) -> serde_json::Value {
    warren.metrics().readiness_json()["pipelines"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == pipeline)
        .cloned()
        .unwrap_or_default()
}

fn last_reload_error(warren: &warren::Running, pipeline: &str) -> Option<String> {
    readiness(warren, pipeline)["last_reload_error"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test]
async fn a_plugin_directory_deleted_recreated_or_swapped_is_followed() -> anyhow::Result<()> {
    let base = test_dir("reload-dir")?;
    let plugins = base.join("plugins");
    let file = plugins.join("current.wasm");
    std::fs::create_dir(&plugins)?;
    std::fs::copy(plugin("tag_a"), &file)?;
    let warren = start(config(&pipeline_at(
        "dir",
        &unique("reload-dir"),
        &file,
        "",
    ))?)
    .await?;
    let m = warren.metrics().pipeline("dir").expect("pipeline metrics");
    let (a, b) = (
        digest_version(&plugin("tag_a"))?,
        digest_version(&plugin("tag_b"))?,
    );
    let missing = |w: &warren::Running| readiness(w, "dir")["plugin_file_missing"] == true;

    // rm -rf plugins; mkdir plugins; cp new.wasm plugins/current.wasm
    std::fs::remove_dir_all(&plugins)?;
    eventually(WAIT, || missing(&warren)).await?;
    std::fs::create_dir(&plugins)?;
    std::fs::copy(plugin("tag_b"), &file)?;
    eventually(WAIT, || m.plugin.version() == b && !missing(&warren))
        .await
        .map_err(|e| anyhow::anyhow!("re-created directory not followed: {e}"))?;

    // mv plugins plugins.old; mv plugins.new plugins
    std::fs::create_dir(base.join("plugins.new"))?;
    std::fs::copy(plugin("tag_a"), base.join("plugins.new/current.wasm"))?;
    std::fs::rename(&plugins, base.join("plugins.old"))?;
    std::fs::rename(base.join("plugins.new"), &plugins)?;
    eventually(WAIT, || m.plugin.version() == a)
        .await
        .map_err(|e| anyhow::anyhow!("directory swapped by rename not followed: {e}"))?;

    // The directory now at the path is the one watched: a write in it is seen.
    std::fs::write(&file, std::fs::read(plugin("tag_b"))?)?;
    eventually(WAIT, || m.plugin.version() == b).await?;

    // Moved away and back (the same directory again), then written in.
    std::fs::rename(&plugins, base.join("plugins.away"))?;
    std::fs::rename(base.join("plugins.away"), &plugins)?;
    std::fs::write(&file, std::fs::read(plugin("tag_a"))?)?;
    eventually(WAIT, || m.plugin.version() == a)
        .await
        .map_err(|e| anyhow::anyhow!("directory moved back not watched again: {e}"))?;

    // The same for a directory further up.
    let away = PathBuf::from(format!("{}.away", base.display()));
    std::fs::rename(&base, &away)?;
    std::fs::rename(&away, &base)?;
    std::fs::write(&file, std::fs::read(plugin("tag_b"))?)?;
    eventually(WAIT, || m.plugin.version() == b)
        .await
        .map_err(|e| anyhow::anyhow!("ancestor moved back not watched again: {e}"))?;

    assert_eq!(m.plugin.reload_failure_count(), 0);
    assert!(!missing(&warren));
    warren.shutdown().await;
    let _ = std::fs::remove_dir_all(base);
    Ok(())
}

#[tokio::test]
async fn a_flipped_release_symlink_is_followed() -> anyhow::Result<()> {
    // Capistrano-style: base/current -> releases/N, flipped with
    // `ln -s releases/N+1 tmp && mv -T tmp current`.
    let base = test_dir("reload-release")?;
    let release = |n: &str, from: &str| -> anyhow::Result<()> {
        let dir = base.join("releases").join(n).join("plugins");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(plugin(from), dir.join("handler.wasm"))?;
        Ok(())
    };
    let flip = |n: &str| -> anyhow::Result<()> {
        let tmp = base.join("current.tmp");
        std::os::unix::fs::symlink(format!("releases/{n}"), &tmp)?;
        std::fs::rename(&tmp, base.join("current"))?;
        Ok(())
    };
    release("1", "tag_a")?;
    flip("1")?;
    let file = base.join("current/plugins/handler.wasm");
    let warren = start(config(&pipeline_at(
        "release",
        &unique("reload-release"),
        &file,
        "",
    ))?)
    .await?;
    let m = warren
        .metrics()
        .pipeline("release")
        .expect("pipeline metrics");
    let (a, b) = (
        digest_version(&plugin("tag_a"))?,
        digest_version(&plugin("tag_b"))?,
    );

    release("2", "tag_b")?;
    flip("2")?;
    eventually(WAIT, || m.plugin.version() == b)
        .await
        .map_err(|e| anyhow::anyhow!("flip to release 2 not followed: {e}"))?;
    // Rollback, then cleanup of the release left behind: only the flip counts.
    flip("1")?;
    eventually(WAIT, || m.plugin.version() == a).await?;
    std::fs::remove_dir_all(base.join("releases/2"))?;
    // The release the link points to now is watched: a hotfix written into it is seen.
    std::fs::write(&file, std::fs::read(plugin("tag_b"))?)?;
    eventually(WAIT, || m.plugin.version() == b).await?;
    assert_eq!(m.plugin.reload_failure_count(), 0);
    warren.shutdown().await;
    let _ = std::fs::remove_dir_all(base);
    Ok(())
}

#[tokio::test]
async fn a_kubernetes_configmap_volume_update_is_followed() -> anyhow::Result<()> {
    // The layout and update sequence of the kubelet's atomic writer:
    // plugin.wasm -> ..data/plugin.wasm, ..data -> ..<timestamp>; an update
    // writes a new timestamped directory, renames a new link over `..data`,
    // then deletes the old directory.
    let vol = test_dir("reload-k8s")?;
    let publish = |stamp: &str, from: &str, old: Option<&str>| -> anyhow::Result<()> {
        let dir = vol.join(stamp);
        std::fs::create_dir(&dir)?;
        std::fs::copy(plugin(from), dir.join("plugin.wasm"))?;
        let tmp = vol.join("..data_tmp");
        std::os::unix::fs::symlink(stamp, &tmp)?;
        std::fs::rename(&tmp, vol.join("..data"))?;
        if let Some(old) = old {
            std::fs::remove_dir_all(vol.join(old))?;
        }
        Ok(())
    };
    publish("..2026_11_30_10_00_00.1", "tag_a", None)?;
    std::os::unix::fs::symlink("..data/plugin.wasm", vol.join("plugin.wasm"))?;
    let warren = start(config(&pipeline_at(
        "k8s",
        &unique("reload-k8s"),
        &vol.join("plugin.wasm"),
        "",
    ))?)
    .await?;
    let m = warren.metrics().pipeline("k8s").expect("pipeline metrics");
    let (a, b) = (
        digest_version(&plugin("tag_a"))?,
        digest_version(&plugin("tag_b"))?,
    );

    publish(
        "..2026_11_30_10_05_00.2",
        "tag_b",
        Some("..2026_11_30_10_00_00.1"),
    )?;
    eventually(WAIT, || m.plugin.version() == b)
        .await
        .map_err(|e| anyhow::anyhow!("first ConfigMap update not followed: {e}"))?;
    publish(
        "..2026_11_30_10_10_00.3",
        "tag_a",
        Some("..2026_11_30_10_05_00.2"),
    )?;
    eventually(WAIT, || m.plugin.version() == a)
        .await
        .map_err(|e| anyhow::anyhow!("second ConfigMap update not followed: {e}"))?;
    assert_eq!(m.plugin.reload_failure_count(), 0);
    assert_eq!(readiness(&warren, "k8s")["plugin_file_missing"], false);
    warren.shutdown().await;
    let _ = std::fs::remove_dir_all(vol);
    Ok(())
}

#[tokio::test]
async fn a_fifo_at_the_plugin_path_is_refused_without_blocking() -> anyhow::Result<()> {
    let (dir, file) = plugin_dir("tag_a")?;
    let q = unique("reload-fifo");
    let out = format!("{q}.out");
    let cfg = config(&pipeline_at("fifo", &q, &file, ""))?;
    let warren = start(cfg.clone()).await?;
    let client = Client::connect().await?;
    client.declare_queue(&out).await?;
    let m = warren.metrics().pipeline("fifo").expect("pipeline metrics");

    std::fs::remove_file(&file)?;
    let made = std::process::Command::new("mkfifo").arg(&file).status()?;
    assert!(made.success(), "mkfifo failed");
    eventually(WAIT, || m.plugin.reload_failure_count() == 1).await?;
    let error = last_reload_error(&warren, "fifo").unwrap_or_default();
    assert!(error.contains("not a regular file"), "{error}");
    client.send(&q, b"still served").await?;
    assert_eq!(
        header(&client.take_one(&out, WAIT).await?, "x-tag").as_deref(),
        Some("a")
    );

    // `warren check` loads the same way: refused, not hung.
    let loader = warren::plugin_loader(&cfg)?;
    let checked = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || warren::load_plugins(&loader, &cfg).map(|_| ())),
    )
    .await
    .map_err(|_| anyhow::anyhow!("loading a FIFO blocked"))??;
    let error = format!("{:#}", checked.expect_err("a FIFO is not a plugin"));
    assert!(error.contains("not a regular file"), "{error}");

    // A real file put back later is loaded, and the error goes away.
    std::fs::remove_file(&file)?;
    std::fs::copy(plugin("tag_b"), &file)?;
    let b = digest_version(&plugin("tag_b"))?;
    eventually(WAIT, || m.plugin.version() == b).await?;
    assert_eq!(last_reload_error(&warren, "fifo"), None);
    assert_eq!(m.plugin.reload_failure_count(), 1);
    tokio::time::timeout(WAIT, warren.shutdown())
        .await
        .map_err(|_| anyhow::anyhow!("shutdown hung"))?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test]
async fn a_plugin_written_in_separate_appends_loads_without_failures() -> anyhow::Result<()> {
    let (dir, file) = plugin_dir("tag_a")?;
    let warren = start(config(&pipeline_at(
        "appended",
        &unique("reload-append"),
        &file,
        "",
    ))?)
    .await?;
    let m = warren
        .metrics()
        .pipeline("appended")
        .expect("pipeline metrics");
    let bytes = std::fs::read(plugin("tag_b"))?;
    std::fs::File::create(&file)?;
    for chunk in bytes.chunks(bytes.len().div_ceil(10)) {
        let mut f = std::fs::OpenOptions::new().append(true).open(&file)?;
        f.write_all(chunk)?;
        drop(f);
        // A writer pausing between appends for longer than the debounce, so
        // each partial file is closed and quiet when warren looks at it.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let b = digest_version(&plugin("tag_b"))?;
    eventually(WAIT, || m.plugin.version() == b).await?;
    assert_eq!(
        m.plugin.reload_failure_count(),
        0,
        "a partial file was reported"
    );
    assert_eq!(last_reload_error(&warren, "appended"), None);
    warren.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test]
async fn reload_errors_are_cleared_once_the_file_is_good_again() -> anyhow::Result<()> {
    let (dir, file) = plugin_dir("tag_a")?;
    let warren = start(config(&pipeline_at(
        "clears",
        &unique("reload-clears"),
        &file,
        "",
    ))?)
    .await?;
    let m = warren
        .metrics()
        .pipeline("clears")
        .expect("pipeline metrics");
    let a = digest_version(&plugin("tag_a"))?;

    // A copy that stopped halfway and was left alone is reported (its time
    // stamp says it has not changed for a minute), not waited for.
    let bytes = std::fs::read(plugin("tag_b"))?;
    {
        let f = std::fs::File::create(&file)?;
        (&f).write_all(&bytes[..bytes.len() / 2])?;
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))?;
    }
    eventually(WAIT, || m.plugin.reload_failure_count() == 1).await?;
    let error = last_reload_error(&warren, "clears").unwrap_or_default();
    assert!(error.contains("incomplete"), "{error}");

    // The running version put back: nothing to reload, and nothing wrong.
    std::fs::copy(plugin("tag_a"), &file)?;
    eventually(WAIT, || last_reload_error(&warren, "clears").is_none())
        .await
        .map_err(|e| anyhow::anyhow!("error kept after the good file came back: {e}"))?;
    assert_eq!(m.plugin.version(), a);
    assert_eq!(m.plugin.reload_count(), 0);

    // Unreadable, then readable again with the running version. Root reads
    // anything, so this part needs an unprivileged user.
    let mut perms = std::fs::metadata(&file)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o000);
    std::fs::set_permissions(&file, perms.clone())?;
    if std::fs::File::open(&file).is_err() {
        eventually(WAIT, || m.plugin.reload_failure_count() == 2).await?;
        let error = last_reload_error(&warren, "clears").unwrap_or_default();
        assert!(error.contains("ermission denied"), "{error}");
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        std::fs::set_permissions(&file, perms)?;
        eventually(WAIT, || last_reload_error(&warren, "clears").is_none())
            .await
            .map_err(|e| anyhow::anyhow!("\"Permission denied\" kept: {e}"))?;
    } else {
        eprintln!("note: running as root, the unreadable-file part is skipped");
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        std::fs::set_permissions(&file, perms)?;
    }
    warren.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test]
async fn a_plugin_too_big_for_its_own_pipeline_is_refused() -> anyhow::Result<()> {
    // Rust plugins start with 17 pages (1.1 MiB) of linear memory. The engine
    // is sized for the largest pipeline, so only the per-pipeline check can
    // tell that the small one cannot run it.
    let err = warren::start(config(&format!(
        "{}{}",
        crate::pipeline(
            "tiny",
            &unique("reload-tiny"),
            "tag_a",
            "[pipeline.limits]\nmemory_mib = 1\n",
        ),
        crate::pipeline("roomy", &unique("reload-roomy"), "tag_a", "")
    ))?)
    .await
    .expect_err("a plugin that cannot start in 1 MiB is refused at load");
    let err = format!("{err:#}");
    assert!(err.contains("limits.memory_mib = 1"), "{err}");

    // The C example starts with 2 pages, so it fits in 1 MiB; a Rust plugin
    // replacing it fits the roomy pipeline only.
    let Some(small) = language_plugin("c_checksum") else {
        return Ok(());
    };
    let (tiny_dir, tiny_file) = plugin_dir("tag_a")?;
    let (roomy_dir, roomy_file) = plugin_dir("tag_a")?;
    std::fs::copy(&small, &tiny_file)?;
    std::fs::copy(&small, &roomy_file)?;
    let tiny_q = unique("reload-tiny");
    let warren = start(config(&format!(
        "{}{}",
        pipeline_at(
            "tiny",
            &tiny_q,
            &tiny_file,
            "[pipeline.limits]\nmemory_mib = 1\n"
        ),
        pipeline_at("roomy", &unique("reload-roomy"), &roomy_file, "")
    ))?)
    .await?;
    let tiny = warren.metrics().pipeline("tiny").expect("pipeline metrics");
    let roomy = warren
        .metrics()
        .pipeline("roomy")
        .expect("pipeline metrics");
    let (small_version, b) = (digest_version(&small)?, digest_version(&plugin("tag_b"))?);

    std::fs::copy(plugin("tag_b"), &tiny_file)?;
    std::fs::copy(plugin("tag_b"), &roomy_file)?;
    eventually(WAIT, || roomy.plugin.version() == b).await?;
    eventually(WAIT, || tiny.plugin.reload_failure_count() == 1).await?;
    assert_eq!(tiny.plugin.version(), small_version);
    let error = last_reload_error(&warren, "tiny").unwrap_or_default();
    assert!(error.contains("limits.memory_mib = 1"), "{error}");
    // The version kept still serves.
    let mut rpc = warren_tests::RpcClient::connect().await?;
    let reply = text(&rpc.call(&tiny_q, b"hello", WAIT).await?);
    assert!(reply.starts_with("crc32="), "{reply}");
    assert_eq!(roomy.plugin.reload_failure_count(), 0);
    warren.shutdown().await;
    let _ = std::fs::remove_dir_all(tiny_dir);
    let _ = std::fs::remove_dir_all(roomy_dir);
    Ok(())
}
