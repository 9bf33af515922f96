//! The JavaScript, Python and C example plugins (`js_router`, `py_classifier`,
//! `c_checksum`) against the real broker: every outcome each one uses, an RPC
//! reply from each, and a trap in each language charged to its own message.
//!
//! `scripts/build-plugins.sh` skips a language whose toolchain it cannot
//! install. Its test then fails under CI (which must prove every language) and
//! is skipped with a note elsewhere.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use warren::ops::FailureKind;

use lapin::BasicProperties;
use lapin::message::Delivery;
use serde_json::{Value, json};
use warren::disposition::Disposition;
use warren::ops::PipelineMetrics;
use warren_tests::{
    Client, RpcClient, config, eventually, header, headers, language_plugin, start, text, unique,
};

use crate::FAST_RETRY;

const WAIT: Duration = Duration::from_secs(30);

fn with_headers(pairs: &[(&str, &str)]) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers(pairs))
}

fn json_body(d: &Delivery) -> Value {
    serde_json::from_slice(&d.data)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", text(d)))
}

fn content_type(d: &Delivery) -> Option<String> {
    d.properties.content_type().as_ref().map(|s| s.to_string())
}

fn reason(d: &Delivery) -> String {
    header(d, "x-warren-reason").unwrap_or_default()
}

/// Sends a message that makes the plugin fail (`x-fault: trap`) and then a good
/// one: the first is retried and parked with the trap as its reason, the second
/// is handled normally by the same consumer. `said` is what the guest's own
/// crash message contributes to the reason.
async fn trap_is_charged_to_its_message(
    client: &Client,
    q: &str,
    m: &PipelineMetrics,
    body: &[u8],
    said: &str,
) -> anyhow::Result<()> {
    let traps_before = m.failure_count(FailureKind::Trap);
    client
        .publish("", q, body, with_headers(&[("x-fault", "trap")]))
        .await?;
    let d = client.take_one(&format!("{q}.dlq"), WAIT).await?;
    assert_eq!(d.data, body, "the trapping message itself is parked");
    assert!(
        reason(&d).starts_with("gave up after 3 attempts: plugin trapped")
            && reason(&d).contains(said),
        "{}",
        reason(&d)
    );
    assert_eq!(header(&d, "x-warren-attempts").as_deref(), Some("3"));
    assert_eq!(m.failure_count(FailureKind::Trap) - traps_before, 3);
    Ok(())
}

#[tokio::test]
async fn js_router_publishes_acks_replies_dead_letters_and_survives_a_throw() -> anyhow::Result<()>
{
    let Some(wasm) = language_plugin("js_router") else {
        return Ok(());
    };
    let q = unique("js-router");
    let hooks = unique("webhooks");
    let extra = format!(
        "concurrency = 1\n[[pipeline.output]]\nexchange = {hooks:?}\ntype = \"topic\"\n{FAST_RETRY}\
         [pipeline.config]\nexchange = {hooks:?}\ntargets = \"slack\"\n\
         \"targets.critical\" = \"slack,teams,pagerduty\"\n\"pagerduty.routing_key\" = \"pd-key\"\n"
    );
    let toml = crate::pipeline_at("js", &q, &wasm, &extra);
    let warren = start(config(&toml)?).await?;
    let client = Client::connect().await?;
    let out = unique("webhooks-out");
    client.bound_queue(&out, &hooks, "webhook.#").await?;
    let m = warren.metrics().pipeline("js").expect("pipeline metrics");

    // publish: a critical event fans out to three targets, each in its format.
    let event = json!({"event": "deploy.failed", "severity": "critical", "service": "api",
        "summary": "rollout of v42 failed", "url": "https://ci.example/42", "fields": {"sha": "abc123"}});
    client.send(&q, event.to_string().as_bytes()).await?;
    let mut got = client.take(&out, 3, WAIT).await?;
    got.sort_by(|a, b| a.routing_key.as_str().cmp(b.routing_key.as_str()));
    let keys: Vec<&str> = got.iter().map(|d| d.routing_key.as_str()).collect();
    assert_eq!(
        keys,
        ["webhook.pagerduty", "webhook.slack", "webhook.teams"]
    );
    let (pd, slack, teams) = (json_body(&got[0]), json_body(&got[1]), json_body(&got[2]));
    assert_eq!(pd["routing_key"], "pd-key");
    assert_eq!(pd["payload"]["severity"], "critical");
    assert_eq!(pd["payload"]["custom_details"]["sha"], "abc123");
    assert_eq!(
        slack["text"],
        "*[CRITICAL]* api: rollout of v42 failed <https://ci.example/42|details>\n• sha: abc123"
    );
    assert_eq!(teams["@type"], "MessageCard");
    assert_eq!(teams["title"], "api: deploy.failed");
    for d in &got {
        assert_eq!(content_type(d).as_deref(), Some("application/json"));
        assert_eq!(header(d, "x-event").as_deref(), Some("deploy.failed"));
        assert_eq!(header(d, "x-warren-plugin").as_deref(), Some("js_router"));
    }

    // ack: below min_severity, dropped without output.
    client
        .send(
            &q,
            br#"{"event": "cache.miss", "severity": "debug", "summary": "meh"}"#,
        )
        .await?;
    eventually(WAIT, || m.outcome_count(Disposition::Ack) == 1).await?;

    // dead-letter: bad JSON and a missing field, with the plugin's reason.
    let dlq = format!("{q}.dlq");
    client.send(&q, b"{not json").await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert!(reason(&d).starts_with("invalid JSON"), "{}", reason(&d));
    client.send(&q, br#"{"event": "x"}"#).await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert_eq!(reason(&d), r#"missing field "summary""#);

    // reply: an RPC request publishes and tells the caller what was sent.
    let mut rpc = RpcClient::connect().await?;
    let r = rpc
        .call(
            &q,
            br#"{"event": "user.signup", "summary": "ada joined"}"#,
            WAIT,
        )
        .await?;
    assert_eq!(content_type(&r).as_deref(), Some("application/json"));
    assert_eq!(
        json_body(&r),
        json!({"event": "user.signup", "sent": [{"exchange": hooks, "routing_key": "webhook.slack"}]})
    );
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(json_body(&d)["text"], "*[INFO]* unknown: ada joined");

    // trap: an uncaught exception fails only its message.
    trap_is_charged_to_its_message(
        &client,
        &q,
        &m,
        br#"{"event": "x", "summary": "boom"}"#,
        "(fault injected by the x-fault header)",
    )
    .await?;
    client
        .send(&q, br#"{"event": "after.trap", "summary": "still here"}"#)
        .await?;
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(header(&d, "x-event").as_deref(), Some("after.trap"));

    // Counted once the broker's confirm is in, which may be after the
    // effect itself has reached the test.
    eventually(WAIT, || m.outcome_count(Disposition::Publish) == 2).await?;
    eventually(WAIT, || m.outcome_count(Disposition::Reply) == 1).await?;
    eventually(WAIT, || m.outcome_count(Disposition::DeadLetter) == 3).await?;
    warren.shutdown().await;
    Ok(())
}

/// `js_router` with `endpoint.<target>` set: those payloads are POSTed with
/// `fetch` through warren's wasi:http to a real server, the others are still
/// published; a 503 retries the whole event, a 404 dead-letters it, and a URL
/// the pipeline does not allow or a refused connection makes `fetch` reject
/// (retried, then parked).
#[tokio::test]
async fn js_router_posts_to_configured_endpoints_with_fetch() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use warren_tests::http_server::{HttpServer, Reply};

    let Some(wasm) = language_plugin("js_router") else {
        return Ok(());
    };
    let pd_calls = Arc::new(AtomicUsize::new(0));
    let n = pd_calls.clone();
    let server = HttpServer::start(move |r| match r.path.as_str() {
        // PagerDuty is busy the first time: the event is retried.
        "/pd" if n.fetch_add(1, Ordering::Relaxed) == 0 => {
            Reply::Respond(503, Vec::new(), b"busy".to_vec())
        }
        "/pd" => Reply::Respond(202, Vec::new(), b"{}".to_vec()),
        "/gone" => Reply::Respond(404, Vec::new(), b"no such hook".to_vec()),
        _ => Reply::ok("ok"),
    })?;
    let elsewhere = HttpServer::start(|_| Reply::ok("must not be reached"))?;
    let origin = server.url("http", "");
    let q = unique("js-fetch");
    let bad = unique("js-fetch-bad");
    let hooks = unique("js-fetch-hooks");
    let extra = format!(
        "concurrency = 1\n[[pipeline.output]]\nexchange = {hooks:?}\ntype = \"topic\"\n{FAST_RETRY}\
         [pipeline.http]\nallowed_hosts = [{origin:?}]\n\
         [pipeline.config]\nexchange = {hooks:?}\ntargets = \"slack\"\n\
         \"targets.critical\" = \"slack,teams,pagerduty\"\n\"pagerduty.routing_key\" = \"pd-key\"\n\
         \"endpoint.slack\" = {:?}\n\"endpoint.pagerduty\" = {:?}\n",
        server.url("http", "/slack"),
        server.url("http", "/pd"),
    );
    // Critical events go to an origin the pipeline does not allow, errors to
    // an endpoint that answers 404, warnings to an allowed port where nothing
    // listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let closed_origin = format!("http://{closed}");
    let bad_extra = format!(
        "{FAST_RETRY}[pipeline.http]\nallowed_hosts = [{origin:?}, {closed_origin:?}]\n\
         [pipeline.config]\n\"targets.critical\" = \"slack\"\n\"targets.error\" = \"teams\"\n\
         \"targets.warning\" = \"generic\"\n\
         \"endpoint.slack\" = {:?}\n\"endpoint.teams\" = {:?}\n\"endpoint.generic\" = \"{closed_origin}/hook\"\n",
        elsewhere.url("http", "/slack"),
        server.url("http", "/gone"),
    );
    let toml = format!(
        "{}{}",
        crate::pipeline_at("js-fetch", &q, &wasm, &extra),
        crate::pipeline_at("js-fetch-bad", &bad, &wasm, &bad_extra)
    );
    let warren = start(config(&toml)?).await?;
    let client = Client::connect().await?;
    let out = unique("js-fetch-out");
    client.bound_queue(&out, &hooks, "webhook.#").await?;
    let m = warren
        .metrics()
        .pipeline("js-fetch")
        .expect("pipeline metrics");

    let event = json!({"event": "deploy.failed", "severity": "critical", "service": "api",
        "summary": "rollout of v42 failed", "fields": {"sha": "abc123"}});
    client.send(&q, event.to_string().as_bytes()).await?;
    // Attempt 1: Slack 200, PagerDuty 503; attempt 2: both again, both fine.
    let got = server.wait_requests(4, WAIT).await?;
    let mut paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/pd", "/pd", "/slack", "/slack"]);
    for r in &got {
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    let slack = got
        .iter()
        .find(|r| r.path == "/slack")
        .expect("a slack POST");
    let slack: Value = serde_json::from_slice(&slack.body)?;
    assert_eq!(
        slack["text"],
        "*[CRITICAL]* api: rollout of v42 failed\n• sha: abc123"
    );
    let pd = got
        .iter()
        .find(|r| r.path == "/pd")
        .expect("a pagerduty POST");
    let pd: Value = serde_json::from_slice(&pd.body)?;
    assert_eq!(pd["routing_key"], "pd-key");
    assert_eq!(pd["payload"]["severity"], "critical");
    // Teams has no endpoint: published, once, after the POSTs succeeded.
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(d.routing_key.as_str(), "webhook.teams");
    client
        .expect_empty(&out, Duration::from_millis(500))
        .await?;
    eventually(WAIT, || m.outcome_count(Disposition::Publish) == 1).await?;
    assert_eq!(m.outcome_count(Disposition::Retry), 1);

    // An RPC request says what was POSTed; nothing is published.
    let mut rpc = RpcClient::connect().await?;
    let r = rpc
        .call(
            &q,
            br#"{"event": "user.signup", "summary": "ada joined"}"#,
            WAIT,
        )
        .await?;
    assert_eq!(
        json_body(&r),
        json!({"event": "user.signup", "sent": [], "posted": [{"target": "slack", "status": 200}]})
    );
    let got = server.wait_requests(5, WAIT).await?;
    assert_eq!(got[4].path, "/slack");
    client
        .expect_empty(&out, Duration::from_millis(300))
        .await?;

    // Denied: the origin is not in allowed_hosts; nothing reaches it. fetch
    // rejects as for any network error (componentize-js drops the error
    // code), so the router retries, then the message is parked.
    let dlq = format!("{bad}.dlq");
    client
        .send(
            &bad,
            br#"{"event": "db.down", "severity": "critical", "summary": "primary lost"}"#,
        )
        .await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert_eq!(
        reason(&d),
        format!(
            "gave up after 3 attempts: slack endpoint {}: NetworkError when attempting to fetch resource",
            elsewhere.url("http", "/slack")
        )
    );
    assert_eq!(
        elsewhere.accepted(),
        0,
        "a denied request reached its server"
    );
    let mb = warren
        .metrics()
        .pipeline("js-fetch-bad")
        .expect("pipeline metrics");
    assert_eq!(mb.http.denied_count(), 3);
    assert_eq!(mb.failure_count(FailureKind::Trap), 0);

    // A 404 dead-letters with the status and the start of the body.
    client
        .send(
            &bad,
            br#"{"event": "job.failed", "severity": "error", "summary": "nightly"}"#,
        )
        .await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert_eq!(
        reason(&d),
        format!(
            "teams endpoint {} answered 404: no such hook",
            server.url("http", "/gone")
        )
    );

    // A refused connection rejects too (warren reads the body before it
    // answers; componentize-js would trap on a failed body write): retried,
    // then parked, never a trap.
    client
        .send(
            &bad,
            br#"{"event": "disk.full", "severity": "warning", "summary": "90%"}"#,
        )
        .await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert_eq!(
        reason(&d),
        format!(
            "gave up after 3 attempts: generic endpoint {closed_origin}/hook: NetworkError when attempting to fetch resource"
        )
    );
    assert_eq!(mb.failure_count(FailureKind::Trap), 0);
    warren.shutdown().await;
    Ok(())
}

/// `py_webhook`, the Python example of docs/plugins-python.md "Calling an HTTP
/// service": it POSTs each message to a real server through wasi:http; 503
/// retries, Retry-After included; 4xx and a URL the pipeline does not allow
/// dead-letter.
#[tokio::test]
async fn py_webhook_posts_through_wasi_http() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use warren_tests::http_server::{HttpServer, Reply};

    let Some(wasm) = language_plugin("py_webhook") else {
        return Ok(());
    };
    let busy_calls = Arc::new(AtomicUsize::new(0));
    let n = busy_calls.clone();
    let server = HttpServer::start(move |r| match r.path.as_str() {
        "/busy" if n.fetch_add(1, Ordering::Relaxed) == 0 => {
            Reply::Respond(503, vec![("retry-after".into(), "1".into())], Vec::new())
        }
        "/gone" => Reply::Respond(404, Vec::new(), b"no such hook".to_vec()),
        _ => Reply::Respond(204, Vec::new(), Vec::new()),
    })?;
    let elsewhere = HttpServer::start(|_| Reply::ok("must not be reached"))?;
    let origin = server.url("http", "");
    let retry = "[pipeline.retry]\nmax_attempts = 3\ninitial_delay_ms = 100\nmax_delay_ms = 1600\njitter = 0.0\n";
    let mut toml = String::new();
    let mut queues = Vec::new();
    for (name, url) in [
        ("py-hook", server.url("http", "/hook?x=1")),
        ("py-hook-busy", server.url("http", "/busy")),
        ("py-hook-gone", server.url("http", "/gone")),
        ("py-hook-denied", elsewhere.url("http", "/hook")),
    ] {
        let q = unique(name);
        let extra = format!(
            "{retry}[pipeline.http]\nallowed_hosts = [{origin:?}]\n[pipeline.config]\nurl = {url:?}\n"
        );
        toml.push_str(&crate::pipeline_at(name, &q, &wasm, &extra));
        queues.push(q);
    }
    let warren = start(config(&toml)?).await?;
    let client = Client::connect().await?;

    // Delivered: the body and its content type, as sent; the message is acked.
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    client
        .publish("", &queues[0], br#"{"text":"hello"}"#, props)
        .await?;
    let got = server.wait_requests(1, WAIT).await?;
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].path, "/hook?x=1");
    assert_eq!(got[0].body, br#"{"text":"hello"}"#);
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    let m = warren.metrics().pipeline("py-hook").expect("metrics");
    eventually(WAIT, || m.outcome_count(Disposition::Ack) == 1).await?;
    // An RPC request is answered with the status.
    let mut rpc = RpcClient::connect().await?;
    let r = rpc.call(&queues[0], b"ping", WAIT).await?;
    assert_eq!(json_body(&r), json!({"status": 204}));

    // 503 with Retry-After: 1 s is retried in the 1600 ms tier, then delivered.
    client.send(&queues[1], b"later").await?;
    // Two /hook requests came before.
    let got = server.wait_requests(4, WAIT).await?;
    let busy: Vec<_> = got.into_iter().filter(|r| r.path == "/busy").collect();
    assert_eq!(busy.len(), 2);
    let gap = busy[1].at - busy[0].at;
    assert!(gap >= Duration::from_millis(1600), "retried after {gap:?}");
    let mb = warren.metrics().pipeline("py-hook-busy").expect("metrics");
    eventually(WAIT, || mb.outcome_count(Disposition::Ack) == 1).await?;
    assert_eq!(mb.outcome_count(Disposition::Retry), 1);

    // 404: parked with the status and the body.
    client.send(&queues[2], b"x").await?;
    let d = client.take_one(&format!("{}.dlq", queues[2]), WAIT).await?;
    assert_eq!(
        reason(&d),
        format!(
            "webhook {} answered 404: no such hook",
            server.url("http", "/gone")
        )
    );

    // Not allowed: parked at once, and nothing reached the other server.
    client.send(&queues[3], b"x").await?;
    let d = client.take_one(&format!("{}.dlq", queues[3]), WAIT).await?;
    assert_eq!(
        reason(&d),
        format!(
            "webhook {}: denied (add its origin to [pipeline.http] allowed_hosts)",
            elsewhere.url("http", "/hook")
        )
    );
    assert_eq!(header(&d, "x-warren-attempts").as_deref(), Some("1"));
    assert_eq!(elsewhere.accepted(), 0);
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn py_classifier_publishes_acks_retries_replies_dead_letters_and_survives_a_raise()
-> anyhow::Result<()> {
    let Some(wasm) = language_plugin("py_classifier") else {
        return Ok(());
    };
    let q = unique("py-classifier");
    let tickets = unique("tickets");
    // FAST_RETRY's attempts, with tiers up to 3.2 s: the ticket not due yet
    // below is due 3 s after it is sent, far more than its first call takes
    // even in a debug build on a loaded machine, and the tier it asks for
    // covers the time left.
    let retry = "[pipeline.retry]\nmax_attempts = 3\ninitial_delay_ms = 100\nmax_delay_ms = 3200\njitter = 0.0\n";
    let extra = format!(
        "concurrency = 1\n[[pipeline.output]]\nexchange = {tickets:?}\ntype = \"topic\"\n{retry}\
         [pipeline.config]\nexchange = {tickets:?}\n\"keywords.outage\" = \"on fire\"\n"
    );
    let toml = crate::pipeline_at("py", &q, &wasm, &extra);
    let warren = start(config(&toml)?).await?;
    let client = Client::connect().await?;
    let out = unique("tickets-out");
    client.bound_queue(&out, &tickets, "ticket.*").await?;
    let m = warren.metrics().pipeline("py").expect("pipeline metrics");

    // publish: classified, enriched, routed by category.
    client
        .send(
            &q,
            br#"{"id": "T-1", "subject": "Refund", "body": "I was charged twice for my subscription"}"#,
        )
        .await?;
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(d.routing_key.as_str(), "ticket.billing");
    assert_eq!(header(&d, "x-category").as_deref(), Some("billing"));
    let t = json_body(&d);
    assert_eq!(
        (t["id"].as_str(), t["category"].as_str()),
        (Some("T-1"), Some("billing"))
    );

    // config extends the built-in keywords.
    client
        .send(
            &q,
            br#"{"id": "T-2", "subject": "the checkout is on fire"}"#,
        )
        .await?;
    assert_eq!(
        client.take_one(&out, WAIT).await?.routing_key.as_str(),
        "ticket.outage"
    );

    // ack: spam is dropped.
    client
        .send(
            &q,
            br#"{"subject": "WINNER", "body": "crypto giveaway, click here"}"#,
        )
        .await?;
    eventually(WAIT, || m.outcome_count(Disposition::Ack) == 1).await?;

    // dead-letter: the validator's reasons.
    let dlq = format!("{q}.dlq");
    for (body, why) in [
        (&b"[1, 2]"[..], "ticket must be a JSON object"),
        (br#"{"subject": ""}"#, "ticket has no subject and no body"),
        (b"\xff\xfe", "body is not UTF-8"),
    ] {
        client.send(&q, body).await?;
        let d = client.take_one(&dlq, WAIT).await?;
        assert_eq!(reason(&d), why);
    }

    // retry: a ticket not due yet asks for another attempt after the time left,
    // and is published once it is due.
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let due = json!({"id": "T-3", "subject": "login fails", "not_before": now_ms as u64 + 3000});
    client.send(&q, due.to_string().as_bytes()).await?;
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(json_body(&d)["id"], "T-3");
    assert_eq!(d.routing_key.as_str(), "ticket.account");
    assert!(m.outcome_count(Disposition::Retry) >= 1, "it was retried");
    let retries = m.outcome_count(Disposition::Retry);

    // reply: classification as a service, nothing published.
    let mut rpc = RpcClient::connect().await?;
    let r = rpc
        .call(
            &q,
            br#"{"id": "T-4", "subject": "site down, error 500"}"#,
            WAIT,
        )
        .await?;
    assert_eq!(header(&r, "x-category").as_deref(), Some("outage"));
    let answer = json_body(&r);
    assert_eq!(answer["id"], "T-4");
    assert_eq!(answer["category"], "outage");
    assert_eq!(answer["scores"]["outage"], 2);

    // trap: an uncaught exception fails only its message.
    trap_is_charged_to_its_message(
        &client,
        &q,
        &m,
        br#"{"subject": "boom"}"#,
        "(RuntimeError: fault injected by the x-fault header)",
    )
    .await?;
    // Counted once the broker's confirm is in, which may be after the
    // effect itself has reached the test.
    eventually(WAIT, || m.outcome_count(Disposition::Retry) - retries == 2).await?;
    client
        .send(&q, br#"{"id": "T-5", "subject": "password reset"}"#)
        .await?;
    assert_eq!(json_body(&client.take_one(&out, WAIT).await?)["id"], "T-5");
    client
        .expect_empty(&out, Duration::from_millis(200))
        .await?;

    // Counted once the broker's confirm is in, which may be after the
    // effect itself has reached the test.
    eventually(WAIT, || m.outcome_count(Disposition::Publish) == 4).await?;
    eventually(WAIT, || m.outcome_count(Disposition::Reply) == 1).await?;
    eventually(WAIT, || m.outcome_count(Disposition::DeadLetter) == 4).await?;
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn c_checksum_publishes_acks_replies_dead_letters_and_survives_a_trap() -> anyhow::Result<()>
{
    let Some(wasm) = language_plugin("c_checksum") else {
        return Ok(());
    };
    let q = unique("c-checksum");
    let checked = unique("checked");
    let extra = format!(
        "concurrency = 1\n[[pipeline.output]]\nexchange = {checked:?}\n{FAST_RETRY}\
         [pipeline.config]\nexchange = {checked:?}\n"
    );
    let toml = crate::pipeline_at("c", &q, &wasm, &extra);
    let warren = start(config(&toml)?).await?;
    let client = Client::connect().await?;
    let out = unique("checked-out");
    // No routing_key in the config: the incoming one (the queue name) is kept.
    client.bound_queue(&out, &checked, &q).await?;
    let m = warren.metrics().pipeline("c").expect("pipeline metrics");

    // publish: body, content type and headers kept; checksum and length added.
    // CRC-32 of "hello" is 3610a686 (zlib, PNG).
    let props = with_headers(&[("tenant", "acme")]).with_content_type("text/plain".into());
    client.publish("", &q, b"hello", props).await?;
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(text(&d), "hello");
    assert_eq!(content_type(&d).as_deref(), Some("text/plain"));
    assert_eq!(header(&d, "tenant").as_deref(), Some("acme"));
    assert_eq!(header(&d, "x-checksum-crc32").as_deref(), Some("3610a686"));
    assert_eq!(header(&d, "x-body-length").as_deref(), Some("5"));
    assert_eq!(header(&d, "x-warren-plugin").as_deref(), Some("c_checksum"));

    // A matching checksum header passes.
    client
        .publish(
            "",
            &q,
            b"hello",
            with_headers(&[("x-checksum-crc32", "3610A686")]),
        )
        .await?;
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(header(&d, "x-checksum-crc32").as_deref(), Some("3610a686"));

    // dead-letter: a corrupted body, and a malformed header.
    let dlq = format!("{q}.dlq");
    client
        .publish(
            "",
            &q,
            b"hellO",
            with_headers(&[("x-checksum-crc32", "3610a686")]),
        )
        .await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert_eq!(text(&d), "hellO");
    assert!(
        reason(&d).starts_with("checksum mismatch: x-checksum-crc32 says 3610a686, body has "),
        "{}",
        reason(&d)
    );
    client
        .publish("", &q, b"x", with_headers(&[("x-checksum-crc32", "12")]))
        .await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert!(reason(&d).starts_with("malformed x-checksum-crc32"));

    // ack: an empty body has nothing to forward.
    client.send(&q, b"").await?;
    eventually(WAIT, || m.outcome_count(Disposition::Ack) == 1).await?;

    // reply: the checksum comes back to the caller, nothing is published.
    let mut rpc = RpcClient::connect().await?;
    let r = rpc.call(&q, b"hello", WAIT).await?;
    assert_eq!(text(&r), "crc32=3610a686 length=5");
    assert_eq!(header(&r, "x-checksum-crc32").as_deref(), Some("3610a686"));

    // trap: a trap instruction fails only its message.
    trap_is_charged_to_its_message(&client, &q, &m, b"boom", "").await?;
    client.send(&q, b"after").await?;
    assert_eq!(text(&client.take_one(&out, WAIT).await?), "after");
    client
        .expect_empty(&out, Duration::from_millis(200))
        .await?;

    // Counted once the broker's confirm is in, which may be after the
    // effect itself has reached the test.
    eventually(WAIT, || m.outcome_count(Disposition::Publish) == 3).await?;
    eventually(WAIT, || m.outcome_count(Disposition::Reply) == 1).await?;
    eventually(WAIT, || m.outcome_count(Disposition::DeadLetter) == 3).await?;
    warren.shutdown().await;
    Ok(())
}
