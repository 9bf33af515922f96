//! `warren dlq redrive` killed with SIGKILL in the middle of a 10,000-message
//! redrive: nothing is lost, at most the one message in flight exists twice,
//! and a second redrive finishes the job. Runs the real binary against the
//! test broker (`WARREN_TEST_BROKER_URL`, as `scripts/test.sh` starts it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/src/names.rs"]
mod names;

use names::{broker_url, plugin, unique};

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const MESSAGES: usize = 10_000;
/// Messages the first redrive reports moved before it is killed.
const KILL_AFTER: usize = 2_000;
/// Generous: a debug build on a loaded machine moves a few hundred a second.
const DEADLINE: Duration = Duration::from_secs(600);

fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

async fn depth(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

/// Wait until `f` holds, polling the broker.
async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f().await {
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Run `warren dlq redrive`; with `kill_after`, SIGKILL it once it has
/// reported that many messages moved. Returns how many it reported.
fn redrive(config: &std::path::Path, pipeline: &str, kill_after: Option<usize>) -> usize {
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["dlq", "redrive", "--config"])
        .arg(config)
        .args(["--pipeline", pipeline])
        .env_remove("WARREN_BROKER_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting warren dlq redrive");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut moved = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reading redrive's output");
        if line.starts_with("moved #") {
            moved += 1;
            if kill_after == Some(moved) {
                child.kill().expect("SIGKILL");
                break;
            }
        }
    }
    let status = child.wait().expect("waiting for redrive");
    if kill_after.is_none() {
        assert!(status.success(), "the second redrive failed: {status}");
    }
    moved
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_killed_midway_loses_nothing_and_duplicates_at_most_the_one_in_flight() {
    let conn = Connection::connect(&broker_url(), ConnectionProperties::default())
        .await
        .expect("connecting to the test broker");
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let queue = unique("q");
    let target = unique("target");
    let dlq = format!("{queue}.dlq");
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), text("quorum"));
    for (name, args) in [(&dlq, quorum), (&target, FieldTable::default())] {
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    }

    // 10,000 parked messages, as warren parks them, each with its own id;
    // their original address is the target queue.
    let mut confirms = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let mut h = FieldTable::default();
        h.insert("x-warren-reason".into(), text(&format!("dead-letter {i}")));
        h.insert("x-warren-original-exchange".into(), text(""));
        h.insert("x-warren-original-routing-key".into(), text(&target));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(format!("m{i}")))
            .with_headers(h);
        confirms.push(
            ch.basic_publish(
                "".into(),
                dlq.as_str().into(),
                BasicPublishOptions::default(),
                format!("body {i}").as_bytes(),
                props,
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack(), "parking a message");
    }
    until("all parked", async || {
        depth(&ch, &dlq).await as usize == MESSAGES
    })
    .await;

    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("warren.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nurl = {:?}\n\n[[pipeline]]\nname = \"kill\"\nqueue = {queue:?}\nplugin = {:?}\n",
            broker_url(),
            plugin("probe").display().to_string()
        ),
    )
    .unwrap();

    let config2 = config.clone();
    let first = tokio::task::spawn_blocking(move || redrive(&config2, "kill", Some(KILL_AFTER)))
        .await
        .unwrap();
    assert_eq!(first, KILL_AFTER);

    // The broker returns the dead reader's unacknowledged deliveries: every
    // message is in the DLQ or at the target, one may be in both.
    until(
        "every message back in the DLQ or at the target",
        async || {
            let total = depth(&ch, &dlq).await as usize + depth(&ch, &target).await as usize;
            total >= MESSAGES
        },
    )
    .await;
    let total = depth(&ch, &dlq).await as usize + depth(&ch, &target).await as usize;
    assert!(
        total <= MESSAGES + 1,
        "{total} messages after the kill: more than the one in flight doubled"
    );
    assert!(depth(&ch, &target).await as usize >= KILL_AFTER);

    // A second redrive moves the rest.
    let config2 = config.clone();
    tokio::task::spawn_blocking(move || redrive(&config2, "kill", None))
        .await
        .unwrap();
    assert_eq!(depth(&ch, &dlq).await, 0, "the DLQ is empty");

    // Every id exactly once at the target, but for at most one.
    // Counted before consuming: a consumer's prefetched messages are not "ready".
    let expected = depth(&ch, &target).await as usize;
    let reader = conn.create_channel().await.unwrap();
    reader
        .basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = reader
        .basic_consume(
            target.as_str().into(),
            "check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + DEADLINE;
    while seen.values().sum::<usize>() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = tokio::time::timeout(left, consumer.next())
            .await
            .expect("reading the target in time")
            .expect("consumer open")
            .expect("delivery");
        let id = d.properties.message_id().as_ref().unwrap().to_string();
        let redriven = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-warren-redriven").cloned());
        assert!(redriven.is_some(), "{id} carries x-warren-redriven");
        *seen.entry(id).or_default() += 1;
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(seen.len(), MESSAGES, "every id arrived");
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.len() <= 1, "more than one duplicate: {doubled:?}");
    assert!(doubled.iter().all(|(_, n)| **n == 2), "{doubled:?}");

    for q in [&dlq, &target] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}
