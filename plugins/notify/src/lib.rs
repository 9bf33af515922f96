//! `notify`: renders a notification from a JSON event and fans it out, one message
//! per channel.
//!
//! Event: `{"user": "ada", "template": "welcome", "channels": ["email", "sms"],
//! "vars": {"name": "Ada"}, "transient_failure": false}`; only `user` and
//! `template` are required.
//!
//! The text comes from config `template.<template>.<channel>` if set, else
//! `template.<template>`. `{name}` placeholders (`{{name}}` works too) are filled
//! from `vars` (strings, numbers or booleans) and `{user}` from the event's `user`.
//! For each channel, a message goes to the `exchange` with routing
//! key `notify.<channel>`, content type `application/json`, header
//! `x-notify-channel` and body `{"user": .., "channel": .., "text": ..}`.
//!
//! An event that is not JSON, lacks a field, names an unknown template or channel,
//! or leaves a placeholder without a value is dead-lettered with a reason naming
//! the field. A valid event with `"transient_failure": true` is retried instead
//! (to exercise warren's retries).
//!
//! Config keys:
//! * `template.<template>` and `template.<template>.<channel>`: message templates;
//! * `exchange`: where to publish (default `notifications`);
//! * `channels`: comma-separated allowed channels, also the default when the
//!   event names none (default `email,sms,webhook`);
//! * `webhook.url`: when set, the `webhook` channel is delivered by POSTing its
//!   JSON body to this URL instead of publishing it (the pipeline must allow
//!   the URL's origin in `[pipeline.http] allowed_hosts`).
//!
//! Webhook delivery happens before anything is published, so a failed POST
//! publishes nothing: 2xx is delivered; 429 and 5xx ask for a retry, with the
//! server's `Retry-After` (seconds) as the delay when it sends one (warren rounds
//! it up to a retry tier); a timeout or a failed connection retries too; any
//! other status dead-letters the event with the status and the start of the
//! response body, and so does a URL the pipeline does not allow. A retried event
//! may POST again (at-least-once): receivers should deduplicate, e.g. on the
//! `x-notify-id` header (the message id, when the producer set one).

use serde_json::{Map, Value, json};
use std::time::Duration;

use warren_plugin_sdk::{Handler, Message, Outcome, Outgoing, config, http};

struct Notify;

impl Handler for Notify {
    fn handle(msg: Message) -> Outcome {
        let id = msg.message_id().unwrap_or("").to_string();
        let post = |url: &str, body: String| {
            http::post(url)
                .header("x-notify-id", &id)
                .json(&body)
                .send()
        };
        match notify(msg.body(), config, post) {
            Ok(outcome) => outcome,
            Err(reason) => Outcome::dead_letter(reason),
        }
    }
}

warren_plugin_sdk::export!(Notify);

/// Handles one event, reading config through `config` and POSTing webhooks
/// through `post` (parameters so the logic can be tested outside a host).
fn notify(
    body: &[u8],
    config: impl Fn(&str) -> Option<String>,
    post: impl Fn(&str, String) -> Result<http::Response, http::Error>,
) -> Result<Outcome, String> {
    let event: Value =
        serde_json::from_slice(body).map_err(|e| format!("event is not JSON: {e}"))?;
    let event = event.as_object().ok_or("event is not a JSON object")?;
    let user = string_field(event, "user")?;
    let template = string_field(event, "template")?;
    let vars = match event.get("vars") {
        None => &Map::new(),
        Some(Value::Object(vars)) => vars,
        Some(_) => return Err("field vars: must be an object".into()),
    };
    let transient_failure = match event.get("transient_failure") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("field transient_failure: must be a boolean".into()),
    };

    let allowed_list = config("channels").unwrap_or_else(|| "email,sms,webhook".into());
    let allowed: Vec<&str> = allowed_list
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let mut channels: Vec<&str> = match event.get("channels") {
        None => allowed.clone(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|c| {
                let c = c
                    .as_str()
                    .ok_or("field channels: must be a list of strings")?;
                if allowed.contains(&c) {
                    Ok(c)
                } else {
                    Err(format!(
                        "field channels: unknown channel {c:?} (allowed: {})",
                        allowed.join(", ")
                    ))
                }
            })
            .collect::<Result<_, String>>()?,
        Some(_) => return Err("field channels: must be a list of strings".into()),
    };
    dedup_in_order(&mut channels);

    let exchange = config("exchange").unwrap_or_else(|| "notifications".into());
    let webhook_url = config("webhook.url").filter(|u| !u.trim().is_empty());
    let mut webhook = None;
    let mut out = Vec::with_capacity(channels.len());
    for channel in channels {
        let (key, text) = [
            format!("template.{template}.{channel}"),
            format!("template.{template}"),
        ]
        .into_iter()
        .find_map(|key| config(&key).map(|text| (key, text)))
        .ok_or_else(|| {
            format!(
                "field template: unknown template {template:?} for channel {channel:?} \
                     (set config template.{template} or template.{template}.{channel})"
            )
        })?;
        let text = render(&text, &key, user, vars)?;
        let body = json!({"user": user, "channel": channel, "text": text}).to_string();
        if let (Some(url), "webhook") = (&webhook_url, channel) {
            webhook = Some((url.trim().to_string(), body));
            continue;
        }
        out.push(
            Outgoing::new(&exchange, format!("notify.{channel}"), body)
                .content_type("application/json")
                .header("x-notify-channel", channel),
        );
    }
    if transient_failure {
        return Ok(Outcome::retry("transient failure requested by event"));
    }
    if let Some((url, body)) = webhook
        && let Some(not_delivered) = deliver(&url, body, post)
    {
        return Ok(not_delivered);
    }
    Ok(Outcome::publish(out))
}

/// Longest piece of a webhook's error response kept in a dead-letter reason.
const BODY_IN_REASON: usize = 200;

/// POST a webhook; `None` when delivered, else what to do with the event.
fn deliver(
    url: &str,
    body: String,
    post: impl Fn(&str, String) -> Result<http::Response, http::Error>,
) -> Option<Outcome> {
    let res = match post(url, body) {
        Ok(res) => res,
        Err(http::Error::Denied) => {
            return Some(Outcome::dead_letter(format!(
                "webhook {url}: denied (add its origin to [pipeline.http] allowed_hosts)"
            )));
        }
        Err(e) if e.is_transient() => {
            return Some(Outcome::retry(format!("webhook {url}: {e}")));
        }
        Err(e) => return Some(Outcome::dead_letter(format!("webhook {url}: {e}"))),
    };
    if res.is_success() {
        return None;
    }
    let status = res.status;
    if status == 429 || status >= 500 {
        let reason = format!("webhook {url} answered {status}");
        return Some(match res.retry_after() {
            Some(delay) => Outcome::retry_after(reason, delay.min(Duration::from_secs(86_400))),
            None => Outcome::retry(reason),
        });
    }
    let text = res.body_lossy();
    let mut cut = text.len().min(BODY_IN_REASON);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    Some(Outcome::dead_letter(format!(
        "webhook {url} answered {status}: {}",
        &text[..cut]
    )))
}

fn string_field<'a>(event: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match event.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("field {name}: must be a string")),
        None => Err(format!("field {name}: missing")),
    }
}

fn dedup_in_order(items: &mut Vec<&str>) {
    let mut seen = Vec::with_capacity(items.len());
    items.retain(|c| {
        let new = !seen.contains(c);
        seen.push(*c);
        new
    });
}

/// Fills `{name}` (or Mustache-style `{{name}}`) placeholders in `template`
/// (config `key`) from `vars`, `{user}` from `user`.
fn render(
    template: &str,
    key: &str,
    user: &str,
    vars: &Map<String, Value>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (open, close) = if tail.starts_with("{{") {
            ("{{", "}}")
        } else {
            ("{", "}")
        };
        let (name, after) = tail[open.len()..]
            .split_once(close)
            .ok_or_else(|| format!("config {key}: unclosed '{open}'"))?;
        match (name, vars.get(name)) {
            ("user", _) => out.push_str(user),
            (_, Some(Value::String(s))) => out.push_str(s),
            (_, Some(v @ (Value::Number(_) | Value::Bool(_)))) => out.push_str(&v.to_string()),
            (_, Some(_)) => {
                return Err(format!(
                    "field vars.{name}: must be a string, number or boolean"
                ));
            }
            (_, None) => {
                return Err(format!(
                    "field vars: no value for placeholder {{{name}}} in {key}"
                ));
            }
        }
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(event: &str, extra: &[(&str, &str)]) -> Result<Outcome, String> {
        let mut cfg: HashMap<String, String> = HashMap::from([
            (
                "template.welcome".to_owned(),
                "Hello {name}, welcome to warren!".to_owned(),
            ),
            ("template.oops".to_owned(), "Hi {name".to_owned()),
        ]);
        cfg.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        notify(
            event.as_bytes(),
            |k| cfg.get(k).cloned(),
            |_, _| panic!("no webhook.url is configured"),
        )
    }

    fn with_webhook(status: u16, headers: &[(&str, &str)], body: &str) -> Outcome {
        let cfg: HashMap<String, String> = [
            ("template.welcome", "hi {user}"),
            ("webhook.url", "https://hooks.example.com/x"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let response = http::Response {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
        };
        notify(
            br#"{"user":"ada","template":"welcome","channels":["email","webhook"]}"#,
            |k| cfg.get(k).cloned(),
            |url, body| {
                assert_eq!(url, "https://hooks.example.com/x");
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["channel"], "webhook");
                Ok(response.clone())
            },
        )
        .unwrap()
    }

    #[test]
    fn webhooks_are_posted_and_failures_decide_the_outcome() {
        let Outcome::Publish(out) = with_webhook(204, &[], "") else {
            panic!("delivered webhook should publish the other channels");
        };
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].routing_key, "notify.email");
        assert_eq!(
            with_webhook(429, &[("retry-after", "7")], "slow down"),
            Outcome::retry_after(
                "webhook https://hooks.example.com/x answered 429",
                Duration::from_secs(7)
            )
        );
        assert_eq!(
            with_webhook(503, &[], ""),
            Outcome::retry("webhook https://hooks.example.com/x answered 503")
        );
        assert_eq!(
            with_webhook(404, &[], "no such hook"),
            Outcome::dead_letter("webhook https://hooks.example.com/x answered 404: no such hook")
        );
    }

    fn published(outcome: Outcome) -> Vec<(String, Value)> {
        let Outcome::Publish(out) = outcome else {
            panic!("not a publish: {outcome:?}");
        };
        out.into_iter()
            .map(|o| {
                assert_eq!(o.exchange, "notifications");
                assert_eq!(o.content_type.as_deref(), Some("application/json"));
                assert_eq!(o.headers[0].0, "x-notify-channel");
                (o.routing_key, serde_json::from_slice(&o.body).unwrap())
            })
            .collect()
    }

    #[test]
    fn fans_out_with_channel_overrides() {
        let out = run(
            r#"{"user":"ada","template":"welcome","channels":["email","sms","email"],"vars":{"name":"Ada"}}"#,
            &[("template.welcome.sms", "{user}: hi {{name}}!")],
        )
        .unwrap();
        assert_eq!(
            published(out),
            vec![
                (
                    "notify.email".into(),
                    json!({"user":"ada","channel":"email","text":"Hello Ada, welcome to warren!"})
                ),
                (
                    "notify.sms".into(),
                    json!({"user":"ada","channel":"sms","text":"ada: hi Ada!"})
                ),
            ]
        );
    }

    #[test]
    fn defaults_to_all_allowed_channels() {
        let out = run(
            r#"{"user":"ada","template":"welcome","vars":{"name":7}}"#,
            &[("channels", " email , webhook,")],
        )
        .unwrap();
        let keys: Vec<_> = published(out).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["notify.email", "notify.webhook"]);
    }

    #[test]
    fn transient_failure_retries() {
        let out = run(
            r#"{"user":"ada","template":"welcome","vars":{"name":"A"},"transient_failure":true}"#,
            &[],
        );
        assert_eq!(
            out,
            Ok(Outcome::retry("transient failure requested by event"))
        );
    }

    #[test]
    fn bad_events_name_the_field() {
        let cases = [
            ("nope", "event is not JSON"),
            ("[1]", "event is not a JSON object"),
            (r#"{"template":"welcome"}"#, "field user: missing"),
            (
                r#"{"user":1,"template":"welcome"}"#,
                "field user: must be a string",
            ),
            (
                r#"{"user":"a","template":"bye"}"#,
                "field template: unknown template \"bye\"",
            ),
            (
                r#"{"user":"a","template":"welcome"}"#,
                "field vars: no value for placeholder {name}",
            ),
            (
                r#"{"user":"a","template":"welcome","vars":{"name":[]}}"#,
                "field vars.name: must be",
            ),
            (
                r#"{"user":"a","template":"welcome","channels":["fax"]}"#,
                "field channels: unknown channel \"fax\" (allowed: email, sms, webhook)",
            ),
            (
                r#"{"user":"a","template":"oops"}"#,
                "config template.oops: unclosed '{'",
            ),
            (
                r#"{"user":"a","template":"welcome","channels":"sms"}"#,
                "field channels: must be",
            ),
            (
                r#"{"user":"a","template":"welcome","transient_failure":1}"#,
                "field transient_failure: must be a boolean",
            ),
        ];
        for (event, reason) in cases {
            let err = run(event, &[]).unwrap_err();
            assert!(err.starts_with(reason), "{event}: {err}");
        }
    }
}
