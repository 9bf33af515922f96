//! Outbound HTTP from plugins (`[pipeline.http]`) against real HTTP servers
//! started by the tests: the allow-list (host, port, scheme), names that
//! resolve to loopback, redirects, a server that never answers, response and
//! request-count limits, HTTPS with a private CA, and the metrics.

use std::time::{Duration, Instant};
use warren::ops::FailureKind;

use serde_json::Value;
use warren_tests::http_server::{HttpServer, Reply, test_ca};
use warren_tests::{Client, RpcClient, config, header, start, text, toml_path, unique};

use crate::pipeline;

const WAIT: Duration = Duration::from_secs(20);

/// A probe pipeline named `name` with these `[pipeline.http]` lines.
fn probe_with_http(name: &str, queue: &str, extra: &str, http: &str) -> String {
    pipeline(
        name,
        queue,
        "probe",
        &format!("{extra}\n[pipeline.http]\n{http}\n"),
    )
}

/// Send a probe command as an RPC request and parse the JSON reply.
async fn ask(rpc: &mut RpcClient, queue: &str, command: &str) -> anyhow::Result<Value> {
    let reply = rpc.call(queue, command.as_bytes(), WAIT).await?;
    serde_json::from_slice(&reply.data)
        .map_err(|e| anyhow::anyhow!("reply {:?} is not JSON: {e}", text(&reply)))
}

#[tokio::test]
async fn allowed_origins_are_reached_and_everything_else_is_denied() -> anyhow::Result<()> {
    let server = HttpServer::start(|r| Reply::ok(format!("hello {} {}", r.method, r.path)))?;
    let other = HttpServer::start(|_| Reply::ok("must not be reached"))?;
    let q = unique("http-allow");
    let rule = server.url("http", "");
    let warren = start(config(&probe_with_http(
        "http-allow",
        &q,
        "",
        &format!("allowed_hosts = [{rule:?}]"),
    ))?)
    .await?;
    let m = warren.metrics().pipeline("http-allow").expect("metrics");
    let mut rpc = RpcClient::connect().await?;

    // Allowed: scheme, host and port match the rule.
    let v = ask(
        &mut rpc,
        &q,
        &format!("http POST {} hi", server.url("http", "/a?b=1")),
    )
    .await?;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["body"], "hello POST /a?b=1");
    let got = server.wait_requests(1, WAIT).await?;
    assert_eq!(got[0].body, b"hi");
    assert_eq!(
        got[0].header("host"),
        Some(format!("127.0.0.1:{}", server.port()).as_str())
    );

    // Denied before any connection: another port, another scheme, a name
    // (localhost resolves to 127.0.0.1, but no rule names it).
    for url in [
        other.url("http", "/"),
        server.url("https", "/"),
        format!("http://localhost:{}/", server.port()),
        format!("http://[::1]:{}/", server.port()),
        format!("http://127.0.0.2:{}/", server.port()),
    ] {
        let v = ask(&mut rpc, &q, &format!("http GET {url}")).await?;
        assert_eq!(v["error"], "denied", "{url}: {v}");
    }
    assert_eq!(other.accepted(), 0, "a denied request reached a server");
    assert_eq!(server.received().len(), 1);
    assert_eq!(m.http.denied_count(), 5);
    assert_eq!(m.http.request_count(&rule, "200"), 1);

    let prom = warren.metrics().render();
    assert!(
        prom.contains(&format!(
            "warren_http_requests_total{{pipeline=\"http-allow\",host=\"{rule}\",status=\"200\"}} 1"
        )),
        "{prom}"
    );
    assert!(prom.contains("warren_http_denied_total{pipeline=\"http-allow\"} 5"));
    assert!(
        prom.contains("warren_http_request_seconds_bucket{pipeline=\"http-allow\",le=\"+Inf\"} 1")
    );
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_pipeline_without_http_denies_every_request() -> anyhow::Result<()> {
    let server = HttpServer::start(|_| Reply::ok("no"))?;
    let q = unique("http-none");
    let warren = start(config(&pipeline("http-none", &q, "probe", ""))?).await?;
    let m = warren.metrics().pipeline("http-none").expect("metrics");
    let mut rpc = RpcClient::connect().await?;
    let v = ask(
        &mut rpc,
        &q,
        &format!("http GET {}", server.url("http", "/")),
    )
    .await?;
    assert_eq!(v["error"], "denied", "{v}");
    assert_eq!(server.accepted(), 0);
    assert_eq!(m.http.denied_count(), 1);
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn redirects_are_returned_to_the_plugin_not_followed() -> anyhow::Result<()> {
    let target = HttpServer::start(|_| Reply::ok("must not be reached"))?;
    let location = target.url("http", "/secret");
    let loc = location.clone();
    let server = HttpServer::start(move |_| {
        Reply::Respond(302, vec![("location".into(), loc.clone())], Vec::new())
    })?;
    let q = unique("http-redirect");
    let warren = start(config(&probe_with_http(
        "http-redirect",
        &q,
        "",
        &format!("allowed_hosts = [{:?}]", server.url("http", "")),
    ))?)
    .await?;
    let mut rpc = RpcClient::connect().await?;
    let v = ask(
        &mut rpc,
        &q,
        &format!("http GET {}", server.url("http", "/")),
    )
    .await?;
    assert_eq!(v["status"], 302, "{v}");
    assert_eq!(v["location"], location.as_str());
    assert_eq!(target.accepted(), 0, "the redirect was followed");
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_server_that_never_answers_costs_the_message_its_deadline_only() -> anyhow::Result<()> {
    let hang = HttpServer::start(|_| Reply::Hang)?;
    let fine = HttpServer::start(|_| Reply::ok("fine"))?;
    let q = unique("http-hang");
    // One worker; the request's own timeout is far beyond the message's.
    let extra = "concurrency = 1\n[pipeline.retry]\nmax_attempts = 1\n[pipeline.limits]\ntimeout_ms = 1500\n";
    let warren = start(config(&probe_with_http(
        "http-hang",
        &q,
        extra,
        &format!(
            "allowed_hosts = [{:?}, {:?}]\ntimeout_ms = 600000",
            hang.url("http", ""),
            fine.url("http", "")
        ),
    ))?)
    .await?;
    let m = warren.metrics().pipeline("http-hang").expect("metrics");
    let client = Client::connect().await?;
    let mut rpc = RpcClient::connect().await?;
    let started = Instant::now();
    client
        .send(&q, format!("http GET {}", hang.url("http", "/")).as_bytes())
        .await?;
    hang.wait_requests(1, WAIT).await?;
    // The next message waits for the only worker, which the hung request
    // gives back at the first message's deadline.
    let v = ask(&mut rpc, &q, &format!("http GET {}", fine.url("http", "/"))).await?;
    let took = started.elapsed();
    assert_eq!(v["status"], 200, "{v}");
    assert!(
        took < Duration::from_secs(6),
        "the worker was held for {took:?}"
    );
    let d = client.take_one(&format!("{q}.dlq"), WAIT).await?;
    let reason = header(&d, "x-warren-reason").unwrap_or_default();
    assert!(reason.contains("timed out after 1500 ms"), "{reason}");
    assert_eq!(m.failure_count(FailureKind::Timeout), 1);
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn responses_and_request_counts_are_capped() -> anyhow::Result<()> {
    let server = HttpServer::start(|r| {
        if r.path == "/big" {
            Reply::ok(vec![b'x'; 10_000])
        } else {
            Reply::ok("small")
        }
    })?;
    let q = unique("http-caps");
    let warren = start(config(&probe_with_http(
        "http-caps",
        &q,
        "",
        &format!(
            "allowed_hosts = [{:?}]\nmax_response_bytes = 1000\nmax_requests_per_message = 2",
            server.url("http", "")
        ),
    ))?)
    .await?;
    let mut rpc = RpcClient::connect().await?;
    let v = ask(
        &mut rpc,
        &q,
        &format!("http GET {}", server.url("http", "/big")),
    )
    .await?;
    assert_eq!(v["error"], "too-large", "{v}");
    let v = ask(
        &mut rpc,
        &q,
        &format!("http GET {}", server.url("http", "/ok")),
    )
    .await?;
    assert_eq!(v["len"], 5, "{v}");

    let before = server.received().len();
    let v = ask(
        &mut rpc,
        &q,
        &format!("http-n 3 {}", server.url("http", "/ok")),
    )
    .await?;
    assert_eq!(v["error"], "denied", "{v}");
    assert_eq!(v["requests"], 2, "{v}");
    assert_eq!(server.received().len() - before, 2);
    // The count is per message: the next one starts again.
    let v = ask(
        &mut rpc,
        &q,
        &format!("http-n 2 {}", server.url("http", "/ok")),
    )
    .await?;
    assert_eq!(v["status"], 200, "{v}");
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn https_with_a_private_ca_needs_its_ca_file() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(unique("http-ca"));
    let (ca, cert, key) = test_ca(&dir)?;
    let server = HttpServer::start_tls(&cert, &key, |_| Reply::ok("secure"))?;
    let rule = server.url("https", "");
    let with_ca = unique("http-tls");
    let without = unique("http-tls-noca");
    let toml = format!(
        "{}{}",
        probe_with_http(
            "http-tls",
            &with_ca,
            "",
            &format!("allowed_hosts = [{rule:?}]\nca_file = {}", toml_path(&ca)),
        ),
        probe_with_http(
            "http-tls-noca",
            &without,
            "",
            &format!("allowed_hosts = [{rule:?}]"),
        )
    );
    let warren = start(config(&toml)?).await?;
    let mut rpc = RpcClient::connect().await?;
    let v = ask(
        &mut rpc,
        &with_ca,
        &format!("http GET {}", server.url("https", "/")),
    )
    .await?;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["body"], "secure");
    // Without the CA the certificate is not trusted.
    let v = ask(
        &mut rpc,
        &without,
        &format!("http GET {}", server.url("https", "/")),
    )
    .await?;
    assert_eq!(v["error"], "other", "{v}");
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("Tls")),
        "{v}"
    );
    warren.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A wildcard rule end to end: the names are pinned to the test server with
/// `resolve` (as curl's `--resolve` would), so the request goes through
/// warren's real rule match, name lookup and connection, and the server sees
/// the name in its Host header.
#[tokio::test]
async fn a_wildcard_rule_reaches_subdomains_pinned_with_resolve() -> anyhow::Result<()> {
    let server =
        HttpServer::start(|r| Reply::ok(format!("hi {}", r.header("host").unwrap_or(""))))?;
    let port = server.port();
    let q = unique("http-wild");
    let pinned = [
        "a.hooks.test",
        "deep.b.hooks.test",
        "hooks.test",
        "evilhooks.test",
    ]
    .map(|n| format!("{n:?} = [\"127.0.0.1\"]"))
    .join(", ");
    let warren = start(config(&probe_with_http(
        "http-wild",
        &q,
        "",
        &format!("allowed_hosts = [\"http://*.hooks.test:{port}\"]\nresolve = {{ {pinned} }}"),
    ))?)
    .await?;
    let m = warren.metrics().pipeline("http-wild").expect("metrics");
    let mut rpc = RpcClient::connect().await?;
    for host in ["a.hooks.test", "deep.b.hooks.test", "A.Hooks.Test."] {
        let v = ask(&mut rpc, &q, &format!("http GET http://{host}:{port}/")).await?;
        assert_eq!(v["status"], 200, "{host}: {v}");
        assert_eq!(v["body"], format!("hi {host}:{port}"), "{host}");
    }
    // The wildcard matches subdomains only: not the parent itself, not a
    // name that merely ends the same way, not another scheme.
    for url in [
        format!("http://hooks.test:{port}/"),
        format!("http://evilhooks.test:{port}/"),
        format!("https://a.hooks.test:{port}/"),
    ] {
        let v = ask(&mut rpc, &q, &format!("http GET {url}")).await?;
        assert_eq!(v["error"], "denied", "{url}: {v}");
    }
    assert_eq!(server.received().len(), 3);
    assert_eq!(m.http.denied_count(), 3);
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_message_holds_no_more_requests_open_than_its_cap() -> anyhow::Result<()> {
    let server = HttpServer::start(|_| Reply::ok("x"))?;
    let q = unique("http-burst");
    let warren = start(config(&probe_with_http(
        "http-burst",
        &q,
        "",
        &format!(
            "allowed_hosts = [{:?}]\nmax_requests_per_message = 100\n\
             max_concurrent_requests_per_message = 3",
            server.url("http", "")
        ),
    ))?)
    .await?;
    let m = warren.metrics().pipeline("http-burst").expect("metrics");
    let mut rpc = RpcClient::connect().await?;
    // 20 requests started before any response is looked at: the first 3
    // are open until the plugin drops their responses, so the other 17 are
    // denied, and only 3 connections are ever made.
    let v = ask(
        &mut rpc,
        &q,
        &format!("http-burst 20 {}", server.url("http", "/burst")),
    )
    .await?;
    assert_eq!(
        (&v["ok"], &v["denied"], &v["other"]),
        (&3.into(), &17.into(), &0.into()),
        "{v}"
    );
    assert_eq!(server.accepted(), 3);
    assert_eq!(m.http.denied_count(), 17);
    // One after the other, each request's slot is free again once its
    // response body is read: a cap of 3 does not limit sequential requests.
    let v = ask(
        &mut rpc,
        &q,
        &format!("http-n 10 {}", server.url("http", "/seq")),
    )
    .await?;
    assert_eq!(
        (&v["status"], &v["requests"]),
        (&200.into(), &10.into()),
        "{v}"
    );
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn denied_requests_count_toward_the_message_budget() -> anyhow::Result<()> {
    let server = HttpServer::start(|_| Reply::ok("x"))?;
    let other = HttpServer::start(|_| Reply::ok("must not be reached"))?;
    let q = unique("http-budget");
    let warren = start(config(&probe_with_http(
        "http-budget",
        &q,
        "",
        &format!(
            "allowed_hosts = [{:?}]\nmax_requests_per_message = 3",
            server.url("http", "")
        ),
    ))?)
    .await?;
    let mut rpc = RpcClient::connect().await?;
    let denied = other.url("http", "/");
    let allowed = server.url("http", "/ok");
    // Three denied requests use the budget of three: the fourth, to an
    // allowed host, is denied too.
    let v = ask(
        &mut rpc,
        &q,
        &format!("http-each {denied} {denied} {denied} {allowed}"),
    )
    .await?;
    assert_eq!(
        v,
        serde_json::json!(["denied", "denied", "denied", "denied"])
    );
    assert_eq!(server.accepted() + other.accepted(), 0);
    // The budget is per message.
    let v = ask(
        &mut rpc,
        &q,
        &format!("http-each {denied} {allowed} {allowed}"),
    )
    .await?;
    assert_eq!(v, serde_json::json!(["denied", 200, 200]));
    warren.shutdown().await;
    Ok(())
}

#[test]
fn bad_http_settings_are_refused_naming_the_field() {
    let q = unique("http-bad");
    for (http, says) in [
        ("allowed_hosts = [\"hooks.example.com\"]", "scheme://host"),
        ("allowed_hosts = [\"https://example.com/path\"]", "no path"),
        (
            "allowed_hosts = [\"https://a.*.example.com\"]",
            "first label",
        ),
        (
            "allowed_hosts = [\"https://example.com:70000\"]",
            "1 to 65535",
        ),
        ("timeout_ms = 0", "http.timeout_ms"),
        ("max_response_bytes = 0", "http.max_response_bytes"),
        (
            "max_requests_per_message = 0",
            "http.max_requests_per_message",
        ),
        (
            "max_concurrent_requests_per_message = 0",
            "http.max_concurrent_requests_per_message",
        ),
        (
            "max_concurrent_requests_per_message = 257",
            "http.max_concurrent_requests_per_message",
        ),
        ("allowed_hosts = [\"http://127.0.0.1:+6310\"]", "1 to 65535"),
        ("allowed_hosts = [\"http://127.0.0.1:06310\"]", "1 to 65535"),
        ("ca_file = \"/nonexistent/ca.pem\"", "http.ca_file"),
        (
            "resolve = { \"*.example.com\" = [\"10.0.0.1\"] }",
            "no wildcards",
        ),
        ("resolve = { \"10.0.0.2\" = [\"10.0.0.1\"] }", "only names"),
        ("resolve = { \"a.example\" = [] }", "at least one address"),
        (
            "resolve = { \"a.example\" = [\"not-an-ip\"] }",
            "invalid IP address syntax",
        ),
        (
            "resolve = { \"a.example\" = [\"10.0.0.1\"], \"A.example\" = [\"10.0.0.2\"] }",
            "listed twice",
        ),
        ("allowed = []", "unknown field"),
    ] {
        let err = match config(&probe_with_http("http-bad", &q, "", http)) {
            Ok(_) => panic!("{http} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(says), "{http}: {err}");
        assert!(
            // Errors found while parsing point at the line instead.
            err.contains("http-bad") || err.contains("TOML parse error"),
            "{http}: {err}"
        );
    }
}

#[tokio::test]
async fn notify_posts_webhooks_and_honours_retry_after_through_the_tiers() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let server = HttpServer::start(move |r| {
        if r.path == "/gone" {
            return Reply::Respond(404, Vec::new(), b"no such hook".to_vec());
        }
        // First call: too many requests, come back in a second.
        if n.fetch_add(1, Ordering::Relaxed) == 0 {
            Reply::Respond(429, vec![("retry-after".into(), "1".into())], Vec::new())
        } else {
            Reply::Respond(204, Vec::new(), Vec::new())
        }
    })?;
    let q = unique("notify-hook");
    let notes = unique("notify-hook-notes");
    let extra = format!(
        "[[pipeline.output]]\nexchange = {notes:?}\ntype = \"topic\"\n\
         [pipeline.retry]\nmax_attempts = 3\ninitial_delay_ms = 100\nmax_delay_ms = 1600\njitter = 0.0\n\
         [pipeline.config]\nexchange = {notes:?}\n\"template.welcome\" = \"Hello {{user}}\"\n\
         \"webhook.url\" = {:?}\n\
         [pipeline.http]\nallowed_hosts = [{:?}]\n",
        server.url("http", "/hook"),
        server.url("http", ""),
    );
    let warren = start(config(&pipeline("notify-hook", &q, "notify", &extra))?).await?;
    let client = Client::connect().await?;
    let out = unique("notify-hook-out");
    client.bound_queue(&out, &notes, "notify.#").await?;
    client
        .send(
            &q,
            br#"{"user":"ada","template":"welcome","channels":["email","webhook"]}"#,
        )
        .await?;
    let got = server.wait_requests(2, WAIT).await?;
    let body: Value = serde_json::from_slice(&got[1].body)?;
    assert_eq!(body["channel"], "webhook");
    assert_eq!(body["text"], "Hello ada");
    assert_eq!(got[1].header("content-type"), Some("application/json"));
    // Retry-After: 1 s rounds up to the 1600 ms tier (tiers: 100 ... 1600).
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_millis(1600), "retried after {gap:?}");
    // Nothing was published on the failed attempt; the email once after.
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(d.routing_key.as_str(), "notify.email");
    client
        .expect_empty(&out, Duration::from_millis(300))
        .await?;

    // Another 4xx dead-letters with the status and the body.
    let gone = unique("notify-gone");
    let extra = format!(
        "[pipeline.config]\n\"template.welcome\" = \"Hello\"\n\"webhook.url\" = {:?}\n\
         [pipeline.http]\nallowed_hosts = [{:?}]\n",
        server.url("http", "/gone"),
        server.url("http", ""),
    );
    let warren2 = start(config(&pipeline("notify-gone", &gone, "notify", &extra))?).await?;
    client
        .send(
            &gone,
            br#"{"user":"ada","template":"welcome","channels":["webhook"]}"#,
        )
        .await?;
    let d = client.take_one(&format!("{gone}.dlq"), WAIT).await?;
    let reason = header(&d, "x-warren-reason").unwrap_or_default();
    assert!(reason.contains("answered 404: no such hook"), "{reason}");
    warren2.shutdown().await;
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn thumbnail_fetches_an_image_by_url_from_an_allowed_host() -> anyhow::Result<()> {
    let img = image::DynamicImage::new_rgb8(300, 150);
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)?;
    let png = png.into_inner();
    let server = HttpServer::start(move |r| {
        if r.path == "/cat.png" {
            Reply::ok(png.clone())
        } else {
            Reply::Respond(404, Vec::new(), b"no".to_vec())
        }
    })?;
    let q = unique("thumb-url");
    let thumbs = unique("thumb-url-out");
    let extra = format!(
        "[[pipeline.output]]\nexchange = {thumbs:?}\ntype = \"fanout\"\n\
         [pipeline.limits]\nmemory_mib = 256\ntimeout_ms = 20000\n\
         [pipeline.config]\noutput_exchange = {thumbs:?}\n\
         [pipeline.http]\nallowed_hosts = [{:?}]\n",
        server.url("http", "")
    );
    let warren = start(config(&pipeline("thumb-url", &q, "thumbnail", &extra))?).await?;
    let client = Client::connect().await?;
    let out = unique("thumb-url-q");
    client.bound_queue(&out, &thumbs, "").await?;
    let body = serde_json::json!({"url": server.url("http", "/cat.png")}).to_string();
    client.send(&q, body.as_bytes()).await?;
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(header(&d, "x-original-width").as_deref(), Some("300"));
    assert_eq!(header(&d, "x-thumbnail-width").as_deref(), Some("128"));

    // A 404 parks the message with the status.
    let body = serde_json::json!({"url": server.url("http", "/dog.png")}).to_string();
    client.send(&q, body.as_bytes()).await?;
    let d = client.take_one(&format!("{q}.dlq"), WAIT).await?;
    let reason = header(&d, "x-warren-reason").unwrap_or_default();
    assert!(reason.contains("status 404"), "{reason}");
    warren.shutdown().await;
    Ok(())
}
