//! The publish allow-list against the real broker: what a plugin may not
//! reach is dead-lettered with the rule that is missing, counted, and never
//! published; what the pipeline lists still works, RPC replies included; the
//! plugin cannot forge warren's headers; a producer's `reply_to` cannot make
//! warren write into a queue warren manages.

use std::time::Duration;

use lapin::BasicProperties;
use warren::allow::DenyKind;
use warren::disposition::Disposition;
use warren_tests::{
    Client, RpcClient, broker_url, config, eventually, header, http, start, text, unique,
};

use crate::{FAST_RETRY, pipeline};

const WAIT: Duration = Duration::from_secs(30);

/// Two pipelines: `hq` (probe) may publish to a topic exchange with keys
/// `notify.*` and, through the default exchange, to one queue; `other`
/// (noop) is a pipeline whose queue `hq` does not list.
struct Setup {
    warren: warren::Running,
    client: Client,
    ops: String,
    name: String,
    q: String,
    other_q: String,
    other_name: String,
    topic: String,
    listed_q: String,
}

async fn setup() -> anyhow::Result<Setup> {
    let q = unique("allow");
    let other_q = unique("allow-other");
    let name = unique("allow-hq");
    let other_name = unique("allow-other");
    let topic = unique("allow-topic");
    let listed_q = unique("allow-listed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let hq = format!(
        "{FAST_RETRY}[[pipeline.output]]\nexchange = {topic:?}\ntype = \"topic\"\n\
         routing_keys = [\"notify.*\"]\n[[pipeline.output]]\nqueues = [{listed_q:?}]\n"
    );
    let text = format!(
        "[broker]\nurl = {:?}\n[ops]\nlisten = \"127.0.0.1:{port}\"\n{}{}",
        broker_url(),
        pipeline(&name, &q, "probe", &hq),
        pipeline(&other_name, &other_q, "noop", ""),
    );
    let cfg = warren::config::Config::parse(&text, std::path::Path::new("."))?;
    let warren = start(cfg).await?;
    let client = Client::connect().await?;
    client.declare_queue(&listed_q).await?;
    Ok(Setup {
        warren,
        client,
        ops: format!("http://127.0.0.1:{port}"),
        name,
        q,
        other_q,
        other_name,
        topic,
        listed_q,
    })
}

#[tokio::test]
async fn denied_publishes_are_dead_lettered_with_the_missing_rule() -> anyhow::Result<()> {
    let s = setup().await?;
    let m = s
        .warren
        .metrics()
        .pipeline(&s.name)
        .expect("pipeline metrics");
    let other = s
        .warren
        .metrics()
        .pipeline(&s.other_name)
        .expect("pipeline metrics");
    let dlq = format!("{}.dlq", s.q);
    // Exists, so that only the allow-list can refuse it (not the broker).
    let unlisted_x = unique("allow-unlisted-x");
    s.client
        .channel
        .exchange_declare(
            unlisted_x.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    let unlisted_q = unique("allow-unlisted-q");
    s.client.bound_queue(&unlisted_q, &unlisted_x, "k").await?;
    let sink = unique("allow-sink");
    s.client.bound_queue(&sink, &s.topic, "#").await?;
    s.client
        .bound_queue(&format!("{sink}.direct"), "amq.direct", "k")
        .await?;

    // (command, what the reason must say)
    let cases = [
        (
            format!("publish {unlisted_x} k x"),
            format!("exchange {unlisted_x:?} is not listed"),
        ),
        (
            format!("publish {} alert.email x", s.topic),
            "matches none of the routing_keys [\"notify.*\"]".to_string(),
        ),
        (
            format!("publish - {unlisted_q} x"),
            format!("queue {unlisted_q:?} is not in any queues = [...]"),
        ),
        (
            format!("publish - {dlq} x"),
            format!(
                "queue {dlq:?} is the dead-letter queue of pipeline {:?}",
                s.name
            ),
        ),
        (
            format!("publish - {}.retry.100 x", s.q),
            format!("is a retry tier of pipeline {:?}", s.name),
        ),
        (
            format!("publish - {} x", s.other_q),
            format!("is the queue of pipeline {:?}", s.other_name),
        ),
        (
            "publish amq.direct k x".to_string(),
            "exchange \"amq.direct\" is not listed".to_string(),
        ),
        (
            // An allowed output does not carry a denied one through.
            format!("reply-publish - {}.dlq x", s.other_q),
            format!(
                "{:?} is the dead-letter queue of pipeline {:?}",
                format!("{}.dlq", s.other_q),
                s.other_name
            ),
        ),
    ];
    for (command, _) in &cases {
        s.client.send(&s.q, command.as_bytes()).await?;
    }
    let parked = s.client.take(&dlq, cases.len(), WAIT).await?;
    for (command, want) in &cases {
        let d = parked
            .iter()
            .find(|d| text(d) == *command)
            .unwrap_or_else(|| panic!("{command:?} was not dead-lettered"));
        let reason = header(d, "x-warren-reason").unwrap_or_default();
        assert!(
            reason.starts_with("publish denied: exchange ") && reason.contains(want),
            "{command}: {reason}"
        );
        assert!(!reason.contains("NOT_FOUND"), "{command}: {reason}");
    }
    let publish_denials = cases.len() as u64;
    eventually(WAIT, || {
        m.denied_count(DenyKind::Publish) == publish_denials
    })
    .await?;
    eventually(WAIT, || {
        m.outcome_count(Disposition::DeadLetter) == publish_denials
    })
    .await?;
    let (status, metrics) = http("GET", &s.ops, "/metrics", None).await?;
    assert_eq!(status, 200);
    let line = format!(
        "warren_denied_total{{pipeline=\"{}\",kind=\"publish\"}} {publish_denials}",
        s.name
    );
    assert!(metrics.contains(&line), "{line} not in:\n{metrics}");

    // Nothing reached any of the targets.
    for queue in [
        &unlisted_q,
        &sink,
        &format!("{sink}.direct"),
        &format!("{}.dlq", s.other_q),
    ] {
        assert_eq!(s.client.depth(queue).await?, 0, "{queue}");
    }
    assert_eq!(s.client.depth(&dlq).await?, 0, "exactly one copy each");
    assert_eq!(
        other.outcome_count(Disposition::Ack),
        0,
        "the other pipeline got nothing"
    );
    s.warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn listed_outputs_and_replies_still_work_and_warren_headers_win() -> anyhow::Result<()> {
    let s = setup().await?;
    let m = s
        .warren
        .metrics()
        .pipeline(&s.name)
        .expect("pipeline metrics");
    let sink = unique("allow-sink");
    s.client.bound_queue(&sink, &s.topic, "#").await?;

    s.client
        .send(
            &s.q,
            format!("publish {} notify.email hello", s.topic).as_bytes(),
        )
        .await?;
    let d = s.client.take_one(&sink, WAIT).await?;
    assert_eq!(text(&d), "hello");
    assert_eq!(d.routing_key.as_str(), "notify.email");

    // A plugin's x-warren-* headers are dropped; warren's stamp stays.
    s.client
        .send(
            &s.q,
            format!(
                "publish-headers - {} x-warren-pipeline=forged;X-Warren-Reason=forged;x-custom=1",
                s.listed_q
            )
            .as_bytes(),
        )
        .await?;
    let d = s.client.take_one(&s.listed_q, WAIT).await?;
    assert_eq!(
        header(&d, "x-warren-pipeline").as_deref(),
        Some(s.name.as_str())
    );
    assert_eq!(header(&d, "X-Warren-Reason"), None);
    assert_eq!(header(&d, "x-warren-reason"), None);
    assert_eq!(header(&d, "x-custom").as_deref(), Some("1"));
    eventually(WAIT, || m.denied_count(DenyKind::Header) == 2).await?;

    // RPC through direct reply-to.
    let mut rpc = RpcClient::connect().await?;
    let reply = rpc.call(&s.q, b"reply pong", WAIT).await?;
    assert_eq!(text(&reply), "pong");

    // An ordinary reply queue that warren does not manage.
    let replies = unique("allow-replies");
    s.client.declare_queue(&replies).await?;
    s.client
        .publish(
            "",
            &s.q,
            b"reply to-a-queue",
            BasicProperties::default()
                .with_reply_to(replies.as_str().into())
                .with_correlation_id("c7".into()),
        )
        .await?;
    let d = s.client.take_one(&replies, WAIT).await?;
    assert_eq!(text(&d), "to-a-queue");
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("c7")
    );

    assert_eq!(m.denied_count(DenyKind::Publish), 0);
    assert_eq!(m.denied_count(DenyKind::Reply), 0);
    assert_eq!(s.client.depth(&format!("{}.dlq", s.q)).await?, 0);
    s.warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_producers_reply_to_cannot_point_warren_at_a_managed_queue() -> anyhow::Result<()> {
    let s = setup().await?;
    let m = s
        .warren
        .metrics()
        .pipeline(&s.name)
        .expect("pipeline metrics");
    let dlq = format!("{}.dlq", s.q);
    let other_dlq = format!("{}.dlq", s.other_q);
    let with_reply_to = |to: &str| {
        BasicProperties::default()
            .with_reply_to(to.into())
            .with_correlation_id("c1".into())
    };
    // The plugin answers: the reply is refused and the message parked.
    s.client
        .publish("", &s.q, b"reply answer", with_reply_to(&other_dlq))
        .await?;
    let d = s.client.take_one(&dlq, WAIT).await?;
    let reason = header(&d, "x-warren-reason").unwrap_or_default();
    assert!(
        reason.starts_with(&format!("reply denied: reply_to {other_dlq:?}"))
            && reason.contains(&format!(
                "the dead-letter queue of pipeline {:?}",
                s.other_name
            )),
        "{reason}"
    );
    eventually(WAIT, || m.denied_count(DenyKind::Reply) == 1).await?;

    // The plugin dead-letters: no error reply goes to a retry tier either.
    // The other pipeline's first tier (default retry policy).
    let tier = format!("{}.retry.1000", s.other_q);
    s.client
        .publish("", &s.q, b"dead-letter broken", with_reply_to(&tier))
        .await?;
    let d = s.client.take_one(&dlq, WAIT).await?;
    assert_eq!(header(&d, "x-warren-reason").as_deref(), Some("broken"));
    // Another pipeline's own queue is refused too.
    s.client
        .publish("", &s.q, b"reply answer", with_reply_to(&s.other_q))
        .await?;
    let d = s.client.take_one(&dlq, WAIT).await?;
    let reason = header(&d, "x-warren-reason").unwrap_or_default();
    assert!(reason.contains("is the queue of pipeline"), "{reason}");
    eventually(WAIT, || m.outcome_count(Disposition::DeadLetter) == 3).await?;

    for queue in [&other_dlq, &tier] {
        assert_eq!(s.client.depth(queue).await?, 0, "warren wrote into {queue}");
    }
    let other = s
        .warren
        .metrics()
        .pipeline(&s.other_name)
        .expect("pipeline metrics");
    assert_eq!(other.outcome_count(Disposition::Ack), 0);
    assert_eq!(m.denied_count(DenyKind::Reply), 2);
    s.warren.shutdown().await;
    Ok(())
}

#[test]
fn listing_warren_managed_queues_is_refused() {
    for queue in ["jobs.dlq", "jobs.retry.1000"] {
        let err = config(&format!(
            "[[pipeline]]\nname = \"x\"\nqueue = \"jobs\"\nplugin = \"p.wasm\"\n\
             [[pipeline.output]]\nqueues = [{queue:?}]\n"
        ))
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
        .expect_err("a managed queue was accepted as an output");
        assert!(
            err.contains("pipeline \"x\"") && err.contains(queue) && err.contains("warren manages"),
            "{err}"
        );
    }
}
