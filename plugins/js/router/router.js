// router.js — the `js_router` example plugin: turns one JSON event into one
// webhook payload per chat/incident target (Slack, Microsoft Teams, PagerDuty,
// or the event as-is), choosing the targets by severity. A target with a
// configured endpoint gets its payload POSTed there with `fetch` (the pipeline
// must allow the endpoint's origin in [pipeline.http]); the others are published.
// Built into plugins/dist/js_router.wasm by scripts/build-plugins.sh;
// docs/plugins-js.md walks through it.
//
// Input: {"event": "deploy.failed", "severity": "error", "summary": "...",
//         "service": "api", "url": "https://...", "fields": {"k": "v"}}
// Config (all optional):
//   exchange               where payloads go (default "webhooks"); routing key
//                          "webhook.<target>"
//   targets                targets for every severity (default "slack")
//   targets.<severity>     targets for one severity, e.g. targets.critical = "slack,pagerduty"
//   min_severity           events below it are dropped (acked); default "info"
//   pagerduty.routing_key  integration key put into PagerDuty payloads
//   endpoint.<target>      URL the target's payload is POSTed to instead of being
//                          published, e.g. endpoint.slack = "https://hooks.slack.com/services/..."
// A POST answered 2xx is done; 429 and 5xx retry the message (honouring
// Retry-After in seconds); another status dead-letters it with the status and
// the start of the body. A rejected fetch (failed connection, timeout, or a
// URL the pipeline does not allow: they look the same, see fetchFailed) is
// retried, and dead-lettered when the attempts run out. Targets
// are POSTed concurrently; a retry POSTs every target of the event again
// (at-least-once per endpoint), and nothing is published before all POSTs
// succeeded.
// An RPC request (one with reply-to) publishes the same payloads and answers the
// caller with what was sent. A header `x-fault: trap` throws, to show that an
// uncaught exception fails only its own message.

import { log, config } from 'warren:plugin/host@0.1.1';

const SEVERITIES = ['debug', 'info', 'warning', 'error', 'critical'];
const JSON_TYPE = 'application/json';
const encoder = new TextEncoder();
// fatal: a body that is not UTF-8 is bad input, not something to guess at.
const decoder = new TextDecoder('utf-8', { fatal: true });

// Outcomes are plain objects: variant cases are { tag, val } with the WIT case
// name; records use camelCase field names; option<T> is the value or undefined.
const ack = () => ({ tag: 'ack' });
const publish = (outgoing) => ({ tag: 'publish', val: outgoing });
const reply = (body, publishAlso) => ({
  tag: 'reply',
  val: { body: json(body), contentType: JSON_TYPE, headers: [], publish: publishAlso },
});
const deadLetter = (reason) => ({ tag: 'dead-letter', val: reason });
const retry = (reason, delayMs) => ({ tag: 'retry', val: { reason, delayMs } });

const json = (value) => encoder.encode(JSON.stringify(value));

// Thrown for bad input; turned into a dead-letter with its message. Anything
// else that escapes `handle` is a bug and traps, which warren retries.
class BadInput extends Error {}

const formatters = {
  slack(e) {
    const link = e.url ? ` <${e.url}|details>` : '';
    const fields = Object.entries(e.fields).map(([k, v]) => `• ${k}: ${v}`);
    return {
      text: [`*[${e.severity.toUpperCase()}]* ${e.service}: ${e.summary}${link}`, ...fields].join('\n'),
    };
  },
  teams(e) {
    return {
      '@type': 'MessageCard',
      '@context': 'https://schema.org/extensions',
      summary: e.summary,
      themeColor: { critical: 'B00020', error: 'E81123', warning: 'FFB900' }[e.severity] ?? '0078D7',
      title: `${e.service}: ${e.event}`,
      text: e.summary,
      sections: [{ facts: Object.entries(e.fields).map(([name, value]) => ({ name, value: String(value) })) }],
      potentialAction: e.url ? [{ '@type': 'OpenUri', name: 'Details', targets: [{ os: 'default', uri: e.url }] }] : [],
    };
  },
  pagerduty(e) {
    return {
      routing_key: config('pagerduty.routing_key') ?? '',
      event_action: 'trigger',
      dedup_key: `${e.service}/${e.event}`,
      payload: {
        summary: `${e.service}: ${e.summary}`,
        source: e.service,
        // PagerDuty knows no "debug"; the lowest it takes is "info".
        severity: e.severity === 'debug' ? 'info' : e.severity,
        custom_details: e.fields,
      },
    };
  },
  generic(e) {
    return e;
  },
};

function parseEvent(body) {
  let e;
  try {
    e = JSON.parse(decoder.decode(body));
  } catch (err) {
    throw new BadInput(`invalid JSON: ${err.message}`);
  }
  if (e === null || typeof e !== 'object' || Array.isArray(e)) throw new BadInput('event must be a JSON object');
  for (const key of ['event', 'summary']) {
    if (typeof e[key] !== 'string' || e[key] === '') throw new BadInput(`missing field "${key}"`);
  }
  const severity = e.severity ?? 'info';
  if (!SEVERITIES.includes(severity)) throw new BadInput(`unknown severity "${severity}"`);
  return {
    event: e.event,
    severity,
    summary: e.summary,
    service: typeof e.service === 'string' ? e.service : 'unknown',
    url: typeof e.url === 'string' ? e.url : undefined,
    fields: e.fields !== null && typeof e.fields === 'object' ? e.fields : {},
  };
}

function targetsFor(severity) {
  const list = config(`targets.${severity}`) ?? config('targets') ?? 'slack';
  const targets = list.split(',').map((t) => t.trim()).filter((t) => t !== '');
  const unknown = targets.filter((t) => !(t in formatters));
  // A config mistake, but the event itself is fine: parking it keeps it for a
  // replay once the config is fixed, instead of dropping it.
  if (unknown.length > 0) throw new BadInput(`unknown target(s) in config: ${unknown.join(', ')}`);
  return targets;
}

function route(msg) {
  const header = (name) => msg.headers.find(([k]) => k === name)?.[1];
  if (header('x-fault') === 'trap') throw new Error('fault injected by the x-fault header');

  const e = parseEvent(msg.body);
  const min = config('min_severity') ?? 'info';
  if (SEVERITIES.indexOf(e.severity) < SEVERITIES.indexOf(min)) {
    log('debug', `dropping ${e.severity} event ${e.event} (min_severity ${min})`);
    return ack();
  }
  const exchange = config('exchange') ?? 'webhooks';
  const targets = targetsFor(e.severity);
  const posts = [];
  const outgoing = [];
  for (const target of targets) {
    const body = json(formatters[target](e));
    const endpoint = config(`endpoint.${target}`)?.trim();
    if (endpoint) {
      posts.push({ target, url: endpoint, body });
      continue;
    }
    outgoing.push({
      exchange,
      routingKey: `webhook.${target}`,
      body,
      contentType: JSON_TYPE,
      headers: [
        ['x-event', e.event],
        ['x-severity', e.severity],
        ['x-target', target],
      ],
    });
  }
  const done = (posted) => {
    const where = [...posted.map((p) => `POST ${p.target}`), ...outgoing.map((o) => o.routingKey)];
    log('info', `${e.event} (${e.severity}) -> ${where.join(', ')}`);
    if (msg.replyTo != null) {
      const answer = { event: e.event, sent: outgoing.map((o) => ({ exchange, routing_key: o.routingKey })) };
      if (posted.length > 0) answer.posted = posted;
      return reply(answer, outgoing);
    }
    return outgoing.length > 0 ? publish(outgoing) : ack();
  };
  // Without endpoints nothing waits, and `handle` stays synchronous.
  if (posts.length === 0) return done([]);
  return Promise.all(posts.map(post)).then((results) => {
    const failed = results.filter((r) => r.outcome !== undefined);
    if (failed.length === 0) return done(results.map(({ target, status }) => ({ target, status })));
    // One target that cannot succeed parks the event; otherwise the longest
    // requested delay wins.
    const dead = failed.find((r) => r.outcome.tag === 'dead-letter');
    if (dead) return dead.outcome;
    const reason = failed.map((r) => r.outcome.val.reason).join('; ');
    const delays = failed.map((r) => r.outcome.val.delayMs).filter((d) => d !== undefined);
    return retry(reason, delays.length > 0 ? Math.max(...delays) : undefined);
  });
}

// Longest piece of an endpoint's error response kept in a dead-letter reason.
const BODY_IN_REASON = 200;
// warren caps a retry delay at its longest tier anyway; this keeps it a u32.
const MAX_DELAY_MS = 86_400_000;

// POST one payload. Resolves to { target, status } when delivered, or with
// `outcome` set to what the message should do instead. Never rejects.
async function post({ target, url, body }) {
  let res;
  try {
    res = await fetch(url, { method: 'POST', headers: { 'content-type': JSON_TYPE }, body });
  } catch (err) {
    return { target, outcome: fetchFailed(target, url, err) };
  }
  const status = res.status;
  if (res.ok) return { target, status };
  const reason = `${target} endpoint ${url} answered ${status}`;
  if (status === 429 || status >= 500) {
    const after = Number(res.headers.get('retry-after'));
    const delay = Number.isFinite(after) && after > 0 ? Math.min(after * 1000, MAX_DELAY_MS) : undefined;
    return { target, outcome: retry(reason, delay) };
  }
  const text = (await res.text().catch(() => '')).slice(0, BODY_IN_REASON);
  return { target, outcome: deadLetter(`${reason}: ${text}`) };
}

// A rejected fetch: the connection failed or timed out, or warren refused the
// URL. componentize-js 0.23.0 rejects all of them with the same TypeError
// ("NetworkError when attempting to fetch resource"): StarlingMonkey drops
// wasi:http's error code, so a denial cannot be told apart here. They are all
// retried; a denial ends in the dead-letter queue once the attempts run out,
// and warren's log and warren_http_denied_total say it was one.
function fetchFailed(target, url, err) {
  return retry(`${target} endpoint ${url}: ${String(err?.message ?? err)}`);
}

// The exported interface `handler` is an object with one method per function.
// It returns a Promise when the event is POSTed somewhere: componentize-js
// then runs the event loop until the Promise settles.
export const handler = {
  handle(msg) {
    try {
      return route(msg);
    } catch (err) {
      if (err instanceof BadInput) {
        log('warn', err.message);
        return deadLetter(err.message);
      }
      throw err;
    }
  },
};
