//! `warren dlq` against the real broker: messages parked by the probe plugin
//! are summarised and shown without being moved or reordered, and redriven
//! selectively, with the rest left in the DLQ in their order; purged
//! selectively the same way. And the on-call case: after a fixed plugin is
//! deployed, only what the broken version parked goes back.

use std::time::Duration;

use warren::config::Config;
use warren::dlq::{self, Purge, Redrive, Selection};
use warren_tests::{Client, config, header, plugin, start, text, unique};

use crate::{FAST_RETRY, pipeline, pipeline_at};

const WAIT: Duration = Duration::from_secs(30);

/// Wait until `queue` holds `n` messages.
async fn depth_reaches(client: &Client, queue: &str, n: u32) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = client.depth(queue).await?;
        if d == n {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{queue} holds {d} message(s), expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A probe pipeline on a fresh queue of type `qt`, with `bodies` parked in
/// its DLQ and warren stopped again.
async fn parked(qt: &str, bodies: &[&str]) -> anyhow::Result<(Config, String)> {
    let q = unique(&format!("dlq-{qt}"));
    let extra = format!("queue_type = {qt:?}\n{FAST_RETRY}");
    let config = config(&pipeline(&unique("dlq"), &q, "probe", &extra))?;
    let warren = start(config.clone()).await?;
    let client = Client::connect().await?;
    for b in bodies {
        client.send(&q, b.as_bytes()).await?;
    }
    let n = u32::try_from(bodies.len())?;
    depth_reaches(&client, &format!("{q}.dlq"), n).await?;
    warren.shutdown().await;
    Ok((config, q))
}

/// Bodies of everything in the DLQ, read without moving anything: in order
/// for a classic DLQ, sorted for a quorum one, which (RabbitMQ 3.10) puts the
/// deliveries a closed channel returns behind the others, so that only the
/// contents, not the order, survive a read.
async fn bodies(config: &Config) -> anyhow::Result<Vec<String>> {
    let p = &config.pipelines[0];
    let all = dlq::read(&config.broker, p, dlq::DEFAULT_LIMIT, &Selection::default()).await?;
    let mut b: Vec<_> = all
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    if p.queue_type == warren::config::QueueType::Quorum {
        b.sort();
    }
    Ok(b)
}

const BODIES: [&str; 5] = [
    "dead-letter alpha 1",
    "dead-letter beta",
    "dead-letter alpha 22",
    "dead-letter beta",
    "dead-letter alpha 7f3a9c",
];

#[tokio::test]
async fn list_counts_by_reason_and_leaves_the_dlq_as_it_was() -> anyhow::Result<()> {
    for qt in ["quorum", "classic"] {
        let (config, q) = parked(qt, &BODIES).await?;
        let p = &config.pipelines[0];
        let before = bodies(&config).await?;
        assert_eq!(before.len(), 5, "{qt}");

        let s = dlq::summarize(&config.broker, p, dlq::DEFAULT_LIMIT).await?;
        assert_eq!((s.count, s.read), (5, 5), "{qt}");
        assert_eq!(
            s.by_reason,
            vec![("alpha N".to_string(), 3), ("beta".to_string(), 2)],
            "{qt}"
        );
        let probe = std::fs::read(&p.plugin)?;
        let version = warren::plugins::digest_of(&probe)[..12].to_string();
        assert_eq!(s.by_version, vec![(version, 5)], "{qt}");
        assert!(s.oldest.is_some() && s.oldest <= s.newest, "{qt}");
        let shown = s.render(std::time::SystemTime::now());
        assert!(
            shown.contains("5 message(s)") && shown.contains("alpha N"),
            "{shown}"
        );

        // A limit below the count reads only that many.
        let s = dlq::summarize(&config.broker, p, 2).await?;
        assert_eq!((s.count, s.read), (5, 2), "{qt}");

        // Nothing moved, nothing reordered.
        assert_eq!(bodies(&config).await?, before, "{qt}");
        let client = Client::connect().await?;
        assert_eq!(client.depth(&format!("{q}.dlq")).await?, 5, "{qt}");
        assert_eq!(client.depth(&q).await?, 0, "{qt}");

        let shown = dlq::read(
            &config.broker,
            p,
            dlq::DEFAULT_LIMIT,
            &Selection {
                reason: Some("BETA".into()),
                ..Selection::default()
            },
        )
        .await?;
        assert_eq!(shown.len(), 2, "{qt}");
        let text = dlq::render_parked(&shown[0]);
        assert!(
            text.contains("x-warren-reason: beta") && text.contains("\"dead-letter beta\""),
            "{text}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn redrive_moves_only_the_selected_messages_and_keeps_the_rest_in_order() -> anyhow::Result<()>
{
    for qt in ["quorum", "classic"] {
        let (config, q) = parked(qt, &BODIES).await?;
        let p = &config.pipelines[0];
        let dlq_name = format!("{q}.dlq");
        let client = Client::connect().await?;
        let before = bodies(&config).await?;
        let alpha = Selection {
            reason: Some("ALPHA".into()),
            ..Selection::default()
        };
        let mut lines = Vec::new();

        // A dry run moves nothing.
        let how = Redrive {
            selection: alpha.clone(),
            limit: dlq::DEFAULT_LIMIT,
            dry_run: true,
            to_queue: None,
        };
        let r = dlq::redrive(&config.broker, p, &how, &mut |l| lines.push(l.to_string())).await?;
        assert_eq!((r.read, r.moved, r.failed), (5, 3, 0), "{qt}");
        assert_eq!(lines.len(), 3, "{qt}: {lines:?}");
        assert!(
            lines.iter().all(|l| l.starts_with("would move")),
            "{lines:?}"
        );
        assert_eq!(bodies(&config).await?, before, "{qt}");
        assert_eq!(client.depth(&q).await?, 0, "{qt}");

        // The messages parked by the current plugin are not selected by
        // "another version than the current one".
        let how = Redrive {
            selection: Selection {
                not_digest: Some(warren::plugins::digest_of(&std::fs::read(&p.plugin)?)),
                ..Selection::default()
            },
            ..how
        };
        let r = dlq::redrive(&config.broker, p, &how, &mut |_| {}).await?;
        assert_eq!(r.moved, 0, "{qt}");

        let how = Redrive {
            selection: alpha.clone(),
            dry_run: false,
            ..how
        };
        lines.clear();
        let r = dlq::redrive(&config.broker, p, &how, &mut |l| lines.push(l.to_string())).await?;
        assert_eq!((r.read, r.moved, r.failed), (5, 3, 0), "{qt}");
        assert!(lines.iter().all(|l| l.starts_with("moved")), "{lines:?}");
        let betas: Vec<_> = before
            .iter()
            .filter(|b| b.contains("beta"))
            .cloned()
            .collect();
        assert_eq!(
            bodies(&config).await?,
            betas,
            "{qt}: the rest stay, in order"
        );
        depth_reaches(&client, &q, 3).await?;

        // Handled again: the probe parks them once more, now carrying how
        // often they were redriven, and without the first round's failure.
        let warren = start(config.clone()).await?;
        depth_reaches(&client, &dlq_name, 5).await?;
        warren.shutdown().await;
        let after = dlq::read(&config.broker, p, dlq::DEFAULT_LIMIT, &Selection::default()).await?;
        assert_eq!(after.len(), 5, "{qt}");
        let alphas = after.iter().filter(|m| m.reason().starts_with("alpha"));
        assert_eq!(alphas.count(), 3, "{qt}");
        for m in after.iter().filter(|m| m.reason().starts_with("alpha")) {
            let redriven = m.header(dlq::REDRIVEN).unwrap_or_default();
            assert!(redriven.starts_with("1, "), "{qt}: {redriven:?}");
            assert_eq!(m.header("x-warren-attempts").as_deref(), Some("1"), "{qt}");
        }

        // A second redrive, to another queue, counts on.
        let target = unique("dlq-target");
        client.declare_queue(&target).await?;
        let how = Redrive {
            to_queue: Some(target.clone()),
            ..how
        };
        let r = dlq::redrive(&config.broker, p, &how, &mut |_| {}).await?;
        assert_eq!(r.moved, 3, "{qt}");
        let back = client.take(&target, 3, WAIT).await?;
        for d in &back {
            assert!(text(d).contains("alpha"), "{qt}");
            let redriven = header(d, dlq::REDRIVEN).unwrap_or_default();
            assert!(redriven.starts_with("2, "), "{qt}: {redriven:?}");
            assert_eq!(header(d, "x-warren-reason"), None, "{qt}");
            assert_eq!(header(d, "x-warren-last-failure"), None, "{qt}");
        }
        assert_eq!(bodies(&config).await?, betas, "{qt}");
        client.delete_queue(&target).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_redrive_with_nowhere_to_go_leaves_the_message_parked() -> anyhow::Result<()> {
    let (config, _q) = parked("quorum", &["dead-letter lost"]).await?;
    let p = &config.pipelines[0];
    let how = Redrive {
        selection: Selection::default(),
        limit: dlq::DEFAULT_LIMIT,
        dry_run: false,
        to_queue: Some(unique("no-such-queue")),
    };
    let r = dlq::redrive(&config.broker, p, &how, &mut |_| {}).await?;
    assert_eq!((r.read, r.moved, r.failed), (1, 0, 1));
    assert_eq!(bodies(&config).await?, vec!["dead-letter lost".to_string()]);
    Ok(())
}

#[tokio::test]
async fn purge_removes_only_the_selected_messages_and_keeps_the_rest_in_order() -> anyhow::Result<()>
{
    let (config, q) = parked("classic", &BODIES).await?;
    let p = &config.pipelines[0];
    let before = bodies(&config).await?;
    let alpha = Selection {
        reason: Some("alpha".into()),
        ..Selection::default()
    };
    let mut lines = Vec::new();
    let how = Purge {
        selection: alpha,
        limit: dlq::DEFAULT_LIMIT,
        dry_run: true,
    };
    let r = dlq::purge(&config.broker, p, &how, &mut |l| lines.push(l.to_string())).await?;
    assert_eq!((r.read, r.removed), (5, 3));
    assert!(
        lines.len() == 3 && lines.iter().all(|l| l.starts_with("would remove")),
        "{lines:?}"
    );
    assert_eq!(bodies(&config).await?, before, "a dry run removes nothing");

    let how = Purge {
        dry_run: false,
        ..how
    };
    let r = dlq::purge(&config.broker, p, &how, &mut |_| {}).await?;
    assert_eq!((r.read, r.removed), (5, 3));
    let betas: Vec<_> = before
        .iter()
        .filter(|b| b.contains("beta"))
        .cloned()
        .collect();
    assert_eq!(bodies(&config).await?, betas, "the rest stay, in order");
    let client = Client::connect().await?;
    assert_eq!(client.depth(&q).await?, 0, "nothing was sent anywhere");

    // Without a filter, everything goes.
    let how = Purge {
        selection: Selection::default(),
        ..how
    };
    let r = dlq::purge(&config.broker, p, &how, &mut |_| {}).await?;
    assert_eq!((r.read, r.removed), (2, 2));
    depth_reaches(&client, &format!("{q}.dlq"), 0).await?;
    Ok(())
}

#[tokio::test]
async fn an_empty_reason_or_a_short_version_is_refused_and_touches_nothing() -> anyhow::Result<()> {
    let (config, q) = parked("classic", &BODIES).await?;
    let p = &config.pipelines[0];
    let before = bodies(&config).await?;
    // What an unset shell variable (`--reason "$R"`) or a typo gives.
    let refused = [
        (Some(""), None),
        (Some(" "), None),
        (Some("\t \n"), None),
        (None, Some("0")),
        (None, Some("abc")),
        (None, Some("not-hex!")),
        (None, Some("ABCD")),
    ];
    for (reason, version) in refused {
        let selection = Selection {
            reason: reason.map(str::to_string),
            version: version.map(str::to_string),
            ..Selection::default()
        };
        for dry_run in [true, false] {
            let how = Purge {
                selection: selection.clone(),
                limit: dlq::DEFAULT_LIMIT,
                dry_run,
            };
            let mut lines = Vec::new();
            let err = dlq::purge(&config.broker, p, &how, &mut |l| lines.push(l.to_string()))
                .await
                .expect_err("a selection that selects more than meant was accepted");
            let what = if reason.is_some() {
                "--reason"
            } else {
                "--version"
            };
            assert!(format!("{err:#}").contains(what), "{err:#}");
            assert!(lines.is_empty(), "{lines:?}");
            let how = Redrive {
                selection: selection.clone(),
                limit: dlq::DEFAULT_LIMIT,
                dry_run,
                to_queue: None,
            };
            assert!(
                dlq::redrive(&config.broker, p, &how, &mut |_| {})
                    .await
                    .is_err()
            );
        }
        assert!(
            dlq::read(&config.broker, p, dlq::DEFAULT_LIMIT, &selection)
                .await
                .is_err()
        );
    }
    assert_eq!(
        bodies(&config).await?,
        before,
        "a refused command moved something"
    );
    let client = Client::connect().await?;
    assert_eq!(client.depth(&q).await?, 0, "a refused redrive published");

    // Four hex digits of the digest are enough, and select by digest.
    let digest = warren::plugins::digest_of(&std::fs::read(&p.plugin)?);
    let how = Purge {
        selection: Selection {
            version: Some(digest[..4].to_string()),
            ..Selection::default()
        },
        limit: dlq::DEFAULT_LIMIT,
        dry_run: true,
    };
    let r = dlq::purge(&config.broker, p, &how, &mut |_| {}).await?;
    assert_eq!((r.read, r.removed), (5, 5));
    Ok(())
}

#[tokio::test]
async fn after_a_fix_is_deployed_only_what_the_old_version_parked_is_redriven() -> anyhow::Result<()>
{
    let q = unique("dlq-fix");
    let out = format!("{q}.out");
    let dir = std::env::temp_dir().join(unique("dlq-fix-plugin"));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("handler.wasm");
    // The broken release: it traps on every message, which parks each one
    // after its retries.
    std::fs::copy(plugin("trap"), &file)?;
    let extra = format!("queue_type = \"quorum\"\n{FAST_RETRY}");
    let config = config(&pipeline_at(&unique("dlq-fix"), &q, &file, &extra))?;
    let p = &config.pipelines[0];
    let client = Client::connect().await?;
    let dlq_name = format!("{q}.dlq");
    client.declare_queue(&out).await?;

    let warren = start(config.clone()).await?;
    for i in 0..3 {
        client
            .send(&q, format!("publish - {out} fixed {i}").as_bytes())
            .await?;
    }
    depth_reaches(&client, &dlq_name, 3).await?;
    warren.shutdown().await;

    // The fix: a plugin that does what the bodies say. It still parks what
    // is really bad, and that must stay parked.
    std::fs::copy(plugin("probe"), &file)?;
    let warren = start(config.clone()).await?;
    client.send(&q, b"dead-letter still bad").await?;
    depth_reaches(&client, &dlq_name, 4).await?;
    warren.shutdown().await;

    let how = Redrive {
        selection: Selection {
            not_digest: Some(warren::plugins::digest_of(&std::fs::read(&file)?)),
            ..Selection::default()
        },
        limit: dlq::DEFAULT_LIMIT,
        dry_run: false,
        to_queue: None,
    };
    let r = dlq::redrive(&config.broker, p, &how, &mut |_| {}).await?;
    assert_eq!((r.read, r.moved, r.failed), (4, 3, 0));
    let left = dlq::read(&config.broker, p, dlq::DEFAULT_LIMIT, &Selection::default()).await?;
    assert_eq!(left.len(), 1);
    assert_eq!(
        String::from_utf8_lossy(&left[0].body),
        "dead-letter still bad"
    );

    // The fixed version handles what the broken one could not.
    let warren = start(config.clone()).await?;
    let mut done: Vec<String> = client.take(&out, 3, WAIT).await?.iter().map(text).collect();
    warren.shutdown().await;
    done.sort();
    assert_eq!(done, ["fixed 0", "fixed 1", "fixed 2"]);
    assert_eq!(client.depth(&dlq_name).await?, 1);
    client.delete_queue(&out).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
