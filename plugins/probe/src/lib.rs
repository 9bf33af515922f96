//! `probe`: test fixture that does whatever the message body says, so integration
//! tests can drive every outcome (and every failure) from one plugin. No config
//! keys of its own (`config <key>` reads any).
//!
//! The body is one command (UTF-8, surrounding whitespace ignored); `<exchange>`
//! may be `-` for the default exchange `""`:
//!
//! | command | outcome |
//! |---|---|
//! | `ack` | ack |
//! | `publish <exchange> <routing_key> <body...>` | one publish, header `x-probe: 1` |
//! | `publish-many <exchange> <routing_key> <n>` | n publishes, bodies `0`..`n-1` |
//! | `publish-headers <exchange> <routing_key> <name>=<value>;...` | one publish of body `headers` with those headers |
//! | `reply <text>` | reply |
//! | `reply-publish <exchange> <routing_key> <text>` | reply plus one publish of `<text>` |
//! | `retry <reason>` | retry with the pipeline's backoff |
//! | `retry-after <ms> <reason>` | retry asking for a delay |
//! | `dead-letter <reason>` | dead-letter |
//! | `trap` | panic (a trap) |
//! | `spin` | loop forever |
//! | `hog` | allocate until memory runs out |
//! | `log <level> <text>` | host log at trace/debug/info/warn/error, then ack |
//! | `log-many <n> <text>` | `n` host log lines at info, then ack |
//! | `config <key>` | reply with the config value, or `<none>` |
//! | `echo-meta` | reply with the message's fields as JSON |
//! | `fail-until <n>` | retry `attempt <k>` while attempt k < n, then ack |
//! | `print <text>` | print to stdout and stderr, then ack |
//! | `count` | reply with how many `count` calls this instance has handled, this one included (state kept in a global: `1` in every fresh instance) |
//! | `sleep <ms>` | keep busy for that long, then ack |
//! | `outage <ms> <reason>` | `host.report-outage(ms, reason)`, then retry with the reason |
//! | `http <method> <url> [body]` | one HTTP request; reply with its result as JSON (below) |
//! | `http-config <key> <url>` | one GET of `<url>` with config value `<key>` appended; reply as `http` |
//! | `http-each <url>...` | one GET after the other; reply with a JSON array of each one's status or error kind (`"denied"`, ...) |
//! | `http-burst <n> <url>` | start `n` GETs of an `http://` URL side by side, then wait for each and drop its response; reply `{"ok": k, "denied": d, "other": o}` |
//! | `http-n <n> <url>` | `n` GET requests, stopping at the first failure; reply as `http` for the last |
//! | `http-publish <url> <exchange> <routing_key> <id>` | POST `id` to `url`; on 2xx publish `id`, else dead-letter with reason `id` |
//!
//! The JSON of `http`: `{"status": 200, "len": 5, "body": "<first 200 bytes>",
//! "location": null, "requests": 1}`, or `{"error": "denied|timeout|too-large|other",
//! "detail": "...", "requests": k}` where `requests` counts the ones that succeeded.
//!
//! Anything else is dead-lettered with `unknown probe command: ...`; bad arguments
//! with `probe: ...`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use warren_plugin_sdk::{Handler, Message, Outcome, Outgoing, RpcReply, config, http, log};

struct Probe;

/// `count` calls this instance has handled: state that lives exactly as long
/// as the instance, for tests of `instance = "reuse"`.
static COUNT: AtomicU64 = AtomicU64::new(0);

impl Handler for Probe {
    fn handle(msg: Message) -> Outcome {
        let Ok(body) = msg.body_str() else {
            return Outcome::dead_letter("probe: command is not UTF-8");
        };
        match run(body.trim(), &msg) {
            Ok(outcome) => outcome,
            Err(reason) => Outcome::dead_letter(format!("probe: {reason}")),
        }
    }
}

warren_plugin_sdk::export!(Probe);

fn run(command: &str, msg: &Message) -> Result<Outcome, String> {
    let (name, args) = command.split_once(' ').unwrap_or((command, ""));
    Ok(match name {
        "ack" => Outcome::ack(),
        "publish" => {
            let [exchange, key, body] = split3(args)?;
            Outcome::publish([Outgoing::new(exchange, key, body).header("x-probe", "1")])
        }
        "publish-many" => {
            let [exchange, key, n] = split3(args)?;
            let n: u32 = number(n)?;
            Outcome::publish(
                (0..n)
                    .map(|i| Outgoing::new(exchange, key, i.to_string()))
                    .collect::<Vec<_>>(),
            )
        }
        "publish-headers" => {
            let [exchange, key, pairs] = split3(args)?;
            let mut out = Outgoing::new(exchange, key, "headers");
            for pair in pairs.split(';').filter(|p| !p.is_empty()) {
                let (name, value) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("expected <name>=<value>, got {pair:?}"))?;
                out = out.header(name, value);
            }
            Outcome::publish([out])
        }
        "reply" => Outcome::reply(args),
        "reply-publish" => {
            let [exchange, key, text] = split3(args)?;
            RpcReply::new(text)
                .publish(Outgoing::new(exchange, key, text))
                .into()
        }
        "retry" => Outcome::retry(args),
        "retry-after" => {
            let (ms, reason) = args.split_once(' ').unwrap_or((args, ""));
            Outcome::retry_after(reason, Duration::from_millis(number(ms)?))
        }
        "dead-letter" => Outcome::dead_letter(args),
        "trap" => panic!("probe: trap requested"),
        "spin" => {
            let mut n = 0u64;
            loop {
                n = black_box(n.wrapping_add(1));
            }
        }
        "hog" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(black_box(vec![0xa5; 1 << 20]));
            }
        }
        "log" => {
            let (level, text) = args.split_once(' ').unwrap_or((args, ""));
            let level = match level {
                "trace" => log::Level::Trace,
                "debug" => log::Level::Debug,
                "info" => log::Level::Info,
                "warn" => log::Level::Warn,
                "error" => log::Level::Error,
                _ => return Err(format!("unknown log level {level:?}")),
            };
            log::log(level, text);
            Outcome::ack()
        }
        "log-many" => {
            let (n, text) = args.split_once(' ').unwrap_or((args, ""));
            let n: u32 = n.parse().map_err(|_| format!("bad count {n:?}"))?;
            for _ in 0..n {
                log::log(log::Level::Info, text);
            }
            Outcome::ack()
        }
        "config" => Outcome::reply(config(args).unwrap_or_else(|| "<none>".into())),
        "echo-meta" => RpcReply::new(meta(msg).to_string())
            .content_type("application/json")
            .into(),
        "fail-until" => {
            let n: u32 = number(args)?;
            if msg.attempt < n {
                Outcome::retry(format!("attempt {}", msg.attempt))
            } else {
                Outcome::ack()
            }
        }
        "outage" => {
            let (ms, reason) = args.split_once(' ').unwrap_or((args, "down"));
            let ms: u64 = number(ms)?;
            warren_plugin_sdk::report_outage(Duration::from_millis(ms), reason);
            Outcome::retry(reason)
        }
        "sleep" => {
            // Busy-wait on the WASI clock: a handler doing real work, for drain tests.
            let until = std::time::Instant::now() + Duration::from_millis(number(args)?);
            while std::time::Instant::now() < until {
                black_box(());
            }
            Outcome::ack()
        }
        "http" => {
            let (method, rest) = args.split_once(' ').unwrap_or((args, ""));
            let (url, body) = rest.split_once(' ').unwrap_or((rest, ""));
            let method = match method {
                "GET" => http::Method::Get,
                "POST" => http::Method::Post,
                "PUT" => http::Method::Put,
                "DELETE" => http::Method::Delete,
                _ => return Err(format!("unknown HTTP method {method:?}")),
            };
            let result = http::request(method, url).body(body).send();
            let ok = u32::from(result.is_ok());
            http_reply(result, ok)
        }
        "http-config" => {
            // `http-config <key> <url>`: GET the URL with the value of
            // config setting <key> appended, as a plugin putting a token in
            // a query string does.
            let (key, url) = args.split_once(' ').unwrap_or((args, ""));
            let value = config(key).ok_or_else(|| format!("no config setting {key:?}"))?;
            let result = http::get(&format!("{url}{value}")).send();
            let ok = u32::from(result.is_ok());
            http_reply(result, ok)
        }
        "http-each" => {
            // `http-each <url> <url> ...`: one GET after the other; reply with
            // a JSON array of each one's status or error kind.
            let results: Vec<_> = args
                .split_whitespace()
                .map(|url| match http::get(url).send() {
                    Ok(res) => json!(res.status),
                    Err(e) => json!(error_kind(&e)),
                })
                .collect();
            RpcReply::new(serde_json::Value::from(results).to_string())
                .content_type("application/json")
                .into()
        }
        "http-burst" => {
            // `http-burst <n> <url>`: start n GETs before waiting for any,
            // then wait for each; reply with how many got a response, were
            // denied, or failed otherwise.
            let (n, url) = args.split_once(' ').unwrap_or((args, ""));
            let n: u32 = number(n)?;
            let (ok, denied, other) = burst(n, url)?;
            RpcReply::new(json!({"ok": ok, "denied": denied, "other": other}).to_string())
                .content_type("application/json")
                .into()
        }
        "http-n" => {
            let (n, url) = args.split_once(' ').unwrap_or((args, ""));
            let n: u32 = number(n)?;
            let mut done = 0;
            let mut last = Err(http::Error::Other("no request made".into()));
            for _ in 0..n {
                last = http::get(url).send();
                if last.is_err() {
                    break;
                }
                done += 1;
            }
            http_reply(last, done)
        }
        "http-publish" => {
            // A handler whose effect depends on a service: the conservation
            // test mixes these with the other outcomes.
            let (url, rest) = args.split_once(' ').unwrap_or((args, ""));
            let [exchange, key, id] = split3(rest)?;
            match http::request(http::Method::Post, url).body(id).send() {
                Ok(res) if (200..300).contains(&res.status) => {
                    Outcome::publish([Outgoing::new(exchange, key, id)])
                }
                _ => Outcome::dead_letter(id),
            }
        }
        "count" => Outcome::reply((COUNT.fetch_add(1, Ordering::Relaxed) + 1).to_string()),
        "print" => {
            println!("{args}");
            eprintln!("{args}");
            Outcome::ack()
        }
        _ => Outcome::dead_letter(format!("unknown probe command: {command}")),
    })
}

/// Start `n` GETs of `url` side by side, then wait for each in turn and
/// drop its response: (responses, denied, other failures).
fn burst(n: u32, url: &str) -> Result<(u32, u32, u32), String> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{ErrorCode, Fields, OutgoingRequest, Scheme};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("http-burst takes an http:// URL, not {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (mut ok, mut denied, mut other) = (0, 0, 0);
    let mut pending = Vec::new();
    for _ in 0..n {
        let req = OutgoingRequest::new(Fields::new());
        let set = req.set_scheme(Some(&Scheme::Http)).is_ok()
            && req.set_authority(Some(authority)).is_ok()
            && req.set_path_with_query(Some(path)).is_ok();
        if !set {
            return Err(format!("http-burst: the host refused {url:?}"));
        }
        match outgoing_handler::handle(req, None) {
            Ok(p) => pending.push(p),
            Err(ErrorCode::HttpRequestDenied) => denied += 1,
            Err(_) => other += 1,
        }
    }
    for p in pending {
        p.subscribe().block();
        match p.get() {
            Some(Ok(Ok(_response))) => ok += 1,
            Some(Ok(Err(ErrorCode::HttpRequestDenied))) => denied += 1,
            _ => other += 1,
        }
    }
    Ok((ok, denied, other))
}

fn error_kind(e: &http::Error) -> &'static str {
    match e {
        http::Error::Denied => "denied",
        http::Error::Timeout => "timeout",
        http::Error::TooLarge => "too-large",
        _ => "other",
    }
}

fn http_reply(result: Result<http::Response, http::Error>, ok: u32) -> Outcome {
    let v = match result {
        Ok(res) => {
            let head = &res.body[..res.body.len().min(200)];
            json!({
                "status": res.status,
                "len": res.body.len(),
                "body": String::from_utf8_lossy(head),
                "location": res.header("location"),
                "requests": ok,
            })
        }
        Err(e) => json!({"error": error_kind(&e), "detail": e.to_string(), "requests": ok}),
    };
    RpcReply::new(v.to_string())
        .content_type("application/json")
        .into()
}

/// `<exchange> <routing_key> <rest...>`, with `-` standing for the default exchange.
fn split3(args: &str) -> Result<[&str; 3], String> {
    let mut parts = args.splitn(3, ' ');
    let (Some(exchange), Some(key)) = (parts.next(), parts.next()) else {
        return Err(format!(
            "expected <exchange> <routing_key> ..., got {args:?}"
        ));
    };
    let exchange = if exchange == "-" { "" } else { exchange };
    Ok([exchange, key, parts.next().unwrap_or("")])
}

fn number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("expected a non-negative integer, got {text:?}"))
}

fn meta(msg: &Message) -> serde_json::Value {
    let headers: serde_json::Map<_, _> = msg
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().into()))
        .collect();
    json!({
        "queue": msg.queue,
        "routing_key": msg.routing_key,
        "exchange": msg.exchange,
        "attempt": msg.attempt,
        "headers": headers,
        "content_type": msg.content_type,
        "message_id": msg.message_id,
        "correlation_id": msg.correlation_id,
        "reply_to": msg.reply_to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(attempt: u32) -> Message {
        Message {
            body: Vec::new(),
            content_type: None,
            exchange: "ex".into(),
            routing_key: "rk".into(),
            queue: "q".into(),
            headers: vec![("h".into(), "v".into())],
            message_id: None,
            correlation_id: Some("c".into()),
            reply_to: Some("r".into()),
            attempt,
        }
    }

    fn probe(command: &str, attempt: u32) -> Outcome {
        let mut m = msg(attempt);
        m.body = command.as_bytes().to_vec();
        Probe::handle(m)
    }

    #[test]
    fn outcomes() {
        assert_eq!(probe(" ack\n", 1), Outcome::ack());
        assert_eq!(
            probe("publish - q hello world", 1),
            Outcome::publish([Outgoing::new("", "q", "hello world").header("x-probe", "1")])
        );
        let Outcome::Publish(many) = probe("publish-many x k 3", 1) else {
            panic!()
        };
        let bodies: Vec<_> = many.iter().map(|o| o.body.as_slice()).collect();
        assert_eq!(bodies, [b"0", b"1", b"2"]);
        assert_eq!(probe("reply hi there", 1), Outcome::reply("hi there"));
        assert_eq!(
            probe("retry-after 1500 slow down", 1),
            Outcome::retry_after("slow down", Duration::from_millis(1500))
        );
        assert_eq!(probe("dead-letter bad", 1), Outcome::dead_letter("bad"));
        assert_eq!(probe("fail-until 3", 2), Outcome::retry("attempt 2"));
        assert_eq!(probe("fail-until 3", 3), Outcome::ack());
        assert_eq!(
            probe("frobnicate now", 1),
            Outcome::dead_letter("unknown probe command: frobnicate now")
        );
        assert_eq!(
            probe("retry-after soon x", 1),
            Outcome::dead_letter(r#"probe: expected a non-negative integer, got "soon""#)
        );
        assert_eq!(
            probe("publish x", 1),
            Outcome::dead_letter(r#"probe: expected <exchange> <routing_key> ..., got "x""#)
        );
    }

    #[test]
    fn echo_meta() {
        let Outcome::Reply(r) = probe("echo-meta", 4) else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["attempt"], 4);
        assert_eq!(v["headers"]["h"], "v");
        assert_eq!(v["message_id"], serde_json::Value::Null);
        assert_eq!(v["reply_to"], "r");
    }
}
