//! Broker-wide conditions, each on a broker of the test's own (the shared test
//! broker cannot have them without disturbing every other test):
//!
//! * a resource alarm, which blocks every publisher: warren shows the blocked
//!   connection, and shutdown still honours its grace;
//! * a short `consumer_timeout`, which closes the channel of a call that runs
//!   longer: the message is parked after `session_death_limit` such closes
//!   instead of looping, and acks that died with the channel are not counted.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use warren::disposition::Disposition;
use warren_tests::{Client, config_for, eventually, header, unique};

use crate::pipeline;

/// How long a condition may take: generous, for a loaded machine.
const WAIT: Duration = Duration::from_secs(120);

/// A private RabbitMQ started with `scripts/broker.sh`, stopped on drop.
struct PrivateBroker {
    port: u16,
    dir: PathBuf,
}

impl PrivateBroker {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker.sh")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(Self::script())
            .args(args)
            .env("BROKER_PORT", self.port.to_string())
            .env("BROKER_DIR", &self.dir)
            // A loaded machine can take longer than the script's default
            // minute to boot a broker.
            .env("BROKER_START_TIMEOUT", "300")
            .env_remove("BROKER_TLS_PORT");
        c
    }

    /// Start one, with `conf` lines added to its rabbitmq.conf and
    /// `advanced` (Erlang terms) as its advanced.config.
    fn start(conf: &str, advanced: &str) -> anyhow::Result<Self> {
        let port = free_port_family()?;
        let dir = std::env::temp_dir().join(unique("private-broker"));
        std::fs::create_dir_all(&dir)?;
        if !advanced.is_empty() {
            std::fs::write(dir.join("advanced.config"), advanced)?;
        }
        let broker = Self { port, dir };
        let out = broker
            .command(&["start"])
            .env("BROKER_CONF_EXTRA", conf)
            .output()
            .context("running broker.sh")?;
        if !out.status.success() {
            bail!(
                "the private broker did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(broker)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["ctl"];
        all.extend_from_slice(args);
        let out = self.command(&all).output()?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.command(&["stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port `p` such that `p`, `p + 1000`, `p + 10000` and `p + 20000` (AMQP,
/// epmd, management, distribution) are all free now. All of them stay below
/// Linux's range for outgoing connections (32768 and up by default): a port
/// in it that is free now can be taken by a client's connection before the
/// broker binds it.
fn free_port_family() -> anyhow::Result<u16> {
    for _ in 0..200 {
        let p = 10_000 + (fastrand_u16() % 1_500);
        let free = [0u16, 1000, 10_000, 20_000]
            .iter()
            .all(|d| std::net::TcpListener::bind(("127.0.0.1", p + d)).is_ok());
        if free {
            return Ok(p);
        }
    }
    bail!("no free port family for a private broker")
}

fn fastrand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ std::process::id()) as u16
}

/// Declare `out` and the classic queue `q` on `broker`, queue `n` messages
/// asking the probe to publish to `out`, then raise the broker's memory
/// alarm: from then on every publisher waits, warren's and the test's.
async fn queue_then_alarm(
    broker: PrivateBroker,
    q: &str,
    out: &str,
    n: usize,
) -> anyhow::Result<PrivateBroker> {
    let client = Client::connect_to(&broker.url()).await?;
    client.declare_queue(out).await?;
    client.declare_classic(q).await?;
    for i in 0..n {
        client
            .send(q, format!("publish - {out} m{i}").as_bytes())
            .await?;
    }
    drop(client);
    tokio::task::spawn_blocking(move || {
        broker.ctl(&["set_vm_memory_high_watermark", "0.0000001"])?;
        anyhow::Ok(broker)
    })
    .await?
}

#[tokio::test]
async fn a_blocked_connection_is_shown_and_shutdown_keeps_its_grace() -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(|| PrivateBroker::start("", "")).await??;
    let q = unique("alarm");
    let out = format!("{q}.out");
    // The work is queued before the alarm and before warren starts: once the
    // alarm is raised, every publisher waits, the test's too.
    let broker = queue_then_alarm(broker, &q, &out, 8).await?;

    let extra = "queue_type = \"classic\"\nconcurrency = 4\nprefetch = 8\n";
    let mut cfg = config_for(&broker.url(), "", &pipeline("alarm", &q, "probe", extra))?;
    cfg.ops.shutdown_grace_ms = 2_000;
    let warren = warren_tests::start(cfg).await?;
    let m = warren
        .metrics()
        .pipeline("alarm")
        .expect("pipeline metrics");
    eventually(WAIT, || m.status.blocked()).await?;
    let ready = warren.metrics().readiness_json();
    assert!(ready["pipelines"][0]["blocked"].is_string(), "{ready}");
    assert!(
        warren
            .metrics()
            .render()
            .contains("warren_broker_blocked{pipeline=\"alarm\"} 1")
    );

    // The broker does not read from a blocked connection, not even its close:
    // shutdown waits out the grace, then leaves.
    let stopping = Instant::now();
    tokio::time::timeout(WAIT, warren.shutdown())
        .await
        .context("shutdown hung on the blocked connection")?;
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(25), "shutdown took {took:?}");
    tokio::task::spawn_blocking(move || drop(broker)).await?;
    Ok(())
}

#[tokio::test]
async fn a_call_longer_than_the_consumer_timeout_is_parked_not_looped() -> anyhow::Result<()> {
    // RabbitMQ looks at the timeout on each channel tick, once a minute by
    // default: every half second here.
    let broker = tokio::task::spawn_blocking(|| {
        PrivateBroker::start(
            "consumer_timeout = 2000",
            "[{rabbit, [{channel_tick_interval, 500}]}].",
        )
    })
    .await??;
    let q = unique("consumer-timeout");
    let dlq = format!("{q}.dlq");
    // A classic queue: no delivery limit would ever end the loop.
    let extra = "queue_type = \"classic\"\nconcurrency = 1\nprefetch = 1\nsession_death_limit = 2\n\
                 [pipeline.limits]\ntimeout_ms = 10000\n";
    let cfg = config_for(&broker.url(), "", &pipeline("slow", &q, "probe", extra))?;
    let warren = warren_tests::start(cfg).await?;
    let m = warren.metrics().pipeline("slow").expect("pipeline metrics");
    let client = Client::connect_to(&broker.url()).await?;
    // Longer than the broker's timeout, within warren's own.
    client.send(&q, b"sleep 5000").await?;
    client.send(&q, b"ack").await?;
    let d = client.take_one(&dlq, Duration::from_secs(120)).await?;
    let reason = header(&d, "x-warren-reason").unwrap_or_default();
    assert!(
        reason.contains("suspected poison message") && reason.contains("died 2 times"),
        "{reason}"
    );
    // The parked copy is counted once its original is acked; the neighbour
    // is handled after it.
    let parked = || m.poison_parked.load(std::sync::atomic::Ordering::Relaxed);
    eventually(WAIT, || {
        parked() >= 1 && m.outcome_count(Disposition::Ack) >= 1
    })
    .await
    .with_context(|| {
        format!(
            "acks counted: {}, parked: {}",
            m.outcome_count(Disposition::Ack),
            parked()
        )
    })?;
    // The long call's acks went out on channels the broker had closed (its
    // close possibly still on the way when warren acked): not counted, only
    // the neighbour's.
    assert_eq!(m.outcome_count(Disposition::Ack), 1);
    assert_eq!(parked(), 1);
    assert_eq!(client.depth(&q).await?, 0);
    drop(client);
    warren.shutdown().await;
    tokio::task::spawn_blocking(move || drop(broker)).await?;
    Ok(())
}

/// Deaths nobody's message caused are charged to no one: with the broker's
/// memory alarm set, warren's effects wait unconfirmed (the broker reads
/// nothing from a blocked connection), and every connection is closed by
/// force four times over. Once the alarm lifts, every message is handled and
/// none is parked as poison, though the same prefetch window was in flight at
/// each death.
#[tokio::test]
async fn deaths_while_blocked_or_closed_by_force_park_no_innocent_message() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    use warren::suspects::Verdict;

    const MESSAGES: usize = 200;
    let broker = tokio::task::spawn_blocking(|| PrivateBroker::start("", "")).await??;
    let q = unique("forced");
    let (out, dlq) = (format!("{q}.out"), format!("{q}.dlq"));
    let broker = queue_then_alarm(broker, &q, &out, MESSAGES).await?;

    let extra = "queue_type = \"classic\"\nconcurrency = 4\nprefetch = 16\n";
    let cfg = config_for(&broker.url(), "", &pipeline("forced", &q, "probe", extra))?;
    let warren = warren_tests::start(cfg).await?;
    let m = warren
        .metrics()
        .pipeline("forced")
        .expect("pipeline metrics");
    let mut broker = broker;
    for round in 0..4 {
        // Effects of a window of messages wait on the blocked connection.
        eventually(WAIT, || {
            m.status.connected.load(Relaxed) && m.status.blocked() && m.in_flight.load(Relaxed) > 0
        })
        .await
        .with_context(|| format!("round {round}: no effects waiting on a blocked connection"))?;
        let before = m.reconnects.load(Relaxed);
        broker = tokio::task::spawn_blocking(move || {
            broker.ctl(&["close_all_connections", "test: closed by force"])?;
            anyhow::Ok(broker)
        })
        .await??;
        eventually(WAIT, || m.reconnects.load(Relaxed) > before)
            .await
            .with_context(|| format!("round {round}: warren did not reconnect"))?;
    }
    let broker = tokio::task::spawn_blocking(move || {
        broker.ctl(&["set_vm_memory_high_watermark", "0.4"])?;
        anyhow::Ok(broker)
    })
    .await??;

    // Each is either handled (its output published) or parked.
    eventually(Duration::from_secs(120), || {
        m.outcome_count(Disposition::Publish) + m.outcome_count(Disposition::DeadLetter)
            >= MESSAGES as u64
    })
    .await
    .context("not every message was settled after the alarm lifted")?;
    let client = Client::connect_to(&broker.url()).await?;
    assert_eq!(
        client.depth(&dlq).await?,
        0,
        "innocent messages were parked"
    );
    assert_eq!(m.outcome_count(Disposition::DeadLetter), 0);
    assert_eq!(client.depth(&q).await?, 0);
    assert_eq!(m.poison_parked.load(Relaxed), 0);
    assert_eq!(m.session_death_count(Verdict::Charged), 0);
    assert!(
        m.session_death_count(Verdict::Forced) + m.session_death_count(Verdict::Blocked) >= 4,
        "each death with effects at risk is judged"
    );
    drop(client);
    warren.shutdown().await;
    tokio::task::spawn_blocking(move || drop(broker)).await?;
    Ok(())
}
