// Peer of the `js_router` plugin for warren's benchmark (scenario 9,
// polyglot): a Node consumer (amqplib) that does what the plugin does on its
// normal path: parse the event, pick the targets by severity, format one
// webhook payload per target and publish it to the topic exchange with
// routing key `webhook.<target>`, then ack the delivery once the broker has
// confirmed every publish (a confirm channel), as warren does.
//
//   NODE_PATH=<dir with node_modules/amqplib> node node_router.cjs <url> <queue> <exchange> <prefetch>
//
// The queue and the exchange already exist (declared by the benchmark).
'use strict';

const amqp = require('amqplib');

const [url, queue, exchange, prefetch] = process.argv.slice(2);
const SEVERITIES = ['debug', 'info', 'warning', 'error', 'critical'];
const JSON_TYPE = 'application/json';
// The plugin's defaults: every severity goes to slack, nothing is dropped
// above info.
const TARGETS = (process.env.BENCH_TARGETS ?? 'slack').split(',');
const MIN_SEVERITY = 'info';

class BadInput extends Error {}

// The plugin's formatters (plugins/js/router/router.js), unchanged.
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
      routing_key: '',
      event_action: 'trigger',
      dedup_key: `${e.service}/${e.event}`,
      payload: {
        summary: `${e.service}: ${e.summary}`,
        source: e.service,
        severity: e.severity === 'debug' ? 'info' : e.severity,
        custom_details: e.fields,
      },
    };
  },
  generic(e) {
    return e;
  },
};

const decoder = new TextDecoder('utf-8', { fatal: true });

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

async function main() {
  const conn = await amqp.connect(url);
  const ch = await conn.createConfirmChannel();
  await ch.prefetch(Number(prefetch));
  const publish = (key, body, headers) =>
    new Promise((resolve, reject) =>
      ch.publish(exchange, key, body, { contentType: JSON_TYPE, headers, persistent: true }, (err) =>
        err ? reject(err) : resolve(),
      ),
    );
  await ch.consume(queue, (msg) => {
    let e;
    try {
      e = parseEvent(msg.content);
    } catch (err) {
      if (!(err instanceof BadInput)) throw err;
      ch.ack(msg);
      return;
    }
    if (SEVERITIES.indexOf(e.severity) < SEVERITIES.indexOf(MIN_SEVERITY)) {
      ch.ack(msg);
      return;
    }
    const sends = TARGETS.map((target) =>
      publish(`webhook.${target}`, Buffer.from(JSON.stringify(formatters[target](e))), {
        'x-event': e.event,
        'x-severity': e.severity,
        'x-target': target,
      }),
    );
    Promise.all(sends).then(
      () => ch.ack(msg),
      () => ch.nack(msg, false, true),
    );
  });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
