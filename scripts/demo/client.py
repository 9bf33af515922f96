#!/usr/bin/env python3
"""The demo's client: a plain AMQP program (pika) talking to warren's pipelines.

warren is invisible to it: it publishes to exchanges and queues and reads what
comes back, exactly as code written for RabbitMQ's tutorials would.

  client.py [--url AMQP_URL] [--timeout SECONDS] [--webhook-log FILE]
            [--only fib,thumbnail,notify,webhook,denied,dead-letter]

`webhook` reads what scripts/demo/receiver.py wrote to FILE (demo.sh starts it
on 127.0.0.1:8025, the URL examples/warren.toml gives the notify pipeline).

Exit status 0 when every step produced what it should, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import uuid
import zlib

import pika
from pika.exceptions import ChannelClosedByBroker, UnroutableError


class StepFailed(Exception):
    """A demo step did not produce what it should."""


# --- PNG in pure Python ---------------------------------------------------------


def make_png(width: int, height: int) -> bytes:
    """An RGB gradient image, encoded as PNG with nothing but zlib and struct."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type 0 (None) for this scanline
        g = 255 * y // max(height - 1, 1)
        for x in range(width):
            r = 255 * x // max(width - 1, 1)
            rows += bytes((r, g, 255 - r))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + chunk(b"IEND", b"")
    )


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise StepFailed(f"the thumbnail is not a PNG (first bytes {data[:16]!r})")
    return struct.unpack(">II", data[16:24])


# --- helpers --------------------------------------------------------------------


def header_text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def print_headers(headers: dict | None, prefix: str = "x-", indent: str = "    ") -> None:
    for key in sorted(headers or {}):
        if key.startswith(prefix):
            print(f"{indent}{key}: {header_text(headers[key])}")


def collect(channel, queue: str, count: int, timeout: float) -> list:
    """Consume up to `count` messages from `queue`, giving up after `timeout` s."""
    got = []
    deadline = time.monotonic() + timeout
    for method, props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=0.25):
        if method is not None:
            got.append((method, props, body))
        if len(got) >= count or time.monotonic() > deadline:
            break
    channel.cancel()
    return got


def need_exchange(channel, name: str) -> None:
    """Fail clearly when an exchange warren declares is not there."""
    try:
        channel.exchange_declare(name, passive=True)
    except ChannelClosedByBroker as e:
        raise StepFailed(
            f"exchange {name!r} does not exist ({e.reply_text}): is warren running "
            "with examples/warren.toml?"
        ) from e


def publish(channel, exchange: str, routing_key: str, body: bytes, props) -> None:
    """Publish with mandatory=True on a confirming channel: an unroutable message is an error."""
    try:
        channel.basic_publish(exchange, routing_key, body, props, mandatory=True)
    except UnroutableError as e:
        raise StepFailed(
            f"nothing is bound to exchange {exchange or '(default)'!r} with routing key "
            f"{routing_key!r}: did warren declare its queues?"
        ) from e


def rpc_call(channel, queue: str, body: bytes, timeout: float):
    """One RPC call via direct reply-to; returns (properties, body) of the reply."""
    replies = []
    corr_id = str(uuid.uuid4())

    def on_reply(_ch, _method, props, reply_body):
        if props.correlation_id == corr_id:
            replies.append((props, reply_body))

    # Direct reply-to: consume from the pseudo-queue before publishing, same channel.
    tag = channel.basic_consume("amq.rabbitmq.reply-to", on_reply, auto_ack=True)
    props = pika.BasicProperties(
        reply_to="amq.rabbitmq.reply-to", correlation_id=corr_id, content_type="text/plain"
    )
    publish(channel, "", queue, body, props)
    deadline = time.monotonic() + timeout
    while not replies and time.monotonic() < deadline:
        channel.connection.process_data_events(time_limit=0.2)
    channel.basic_cancel(tag)
    if not replies:
        raise StepFailed(f"no reply from {queue!r} within {timeout:.0f} s (correlation id {corr_id})")
    return replies[0]


# --- the four steps -------------------------------------------------------------


def step_fib(conn, timeout: float) -> None:
    ch = conn.channel()
    ch.confirm_delivery()
    n = 30
    started = time.monotonic()
    props, body = rpc_call(ch, "rpc_queue", str(n).encode(), timeout)
    ms = (time.monotonic() - started) * 1000
    answer = body.decode("utf-8", "replace")
    print(f"  fib({n}) = {answer}   (round trip {ms:.1f} ms, correlation id {props.correlation_id})")
    print_headers(props.headers)
    if answer.strip() != "832040":
        raise StepFailed(f"expected 832040, got {answer!r}")
    ch.close()


def step_thumbnail(conn, timeout: float) -> None:
    ch = conn.channel()
    ch.confirm_delivery()
    need_exchange(ch, "thumbnails")
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "thumbnails")
    image = make_png(640, 400)
    print(f"  publishing a 640x400 PNG ({len(image)} bytes) to exchange 'uploads', routing key 'image'")
    publish(ch, "uploads", "image", image, pika.BasicProperties(content_type="image/png"))
    got = collect(ch, q, 1, timeout)
    if not got:
        raise StepFailed(f"no thumbnail arrived on exchange 'thumbnails' within {timeout:.0f} s")
    _method, props, body = got[0]
    w, h = png_size(body)
    print(f"  thumbnail: {w}x{h} PNG, {len(body)} bytes, content type {props.content_type}")
    print_headers(props.headers)
    if not (0 < w <= 128 and 0 < h <= 128):
        raise StepFailed(f"thumbnail is {w}x{h}, expected to fit in 128x128")
    ch.close()


def step_notify(conn, timeout: float) -> None:
    ch = conn.channel()
    ch.confirm_delivery()
    need_exchange(ch, "notifications")
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "notifications", routing_key="notify.#")
    event = {
        "user": "ada@example.com",
        "template": "welcome",
        "channels": ["email", "sms"],
        "vars": {"name": "Ada"},
    }
    print(f"  publishing to exchange 'events', routing key 'user.signup': {json.dumps(event)}")
    publish(
        ch,
        "events",
        "user.signup",
        json.dumps(event).encode(),
        pika.BasicProperties(content_type="application/json"),
    )
    got = collect(ch, q, 2, timeout)
    channels = set()
    for method, _props, body in got:
        text = body.decode("utf-8", "replace")
        print(f"  {method.routing_key}: {text}")
        try:
            channels.add(json.loads(text).get("channel"))
        except (ValueError, AttributeError):
            channels.add(method.routing_key.removeprefix("notify."))
    if channels != {"email", "sms"}:
        raise StepFailed(
            f"expected one notification per channel email and sms within {timeout:.0f} s, "
            f"got {len(got)} ({', '.join(sorted(map(str, channels))) or 'none'})"
        )
    ch.close()


WEBHOOK_LOG = None  # set by --webhook-log


def step_webhook(conn, timeout: float) -> None:
    if WEBHOOK_LOG is None:
        raise StepFailed("no --webhook-log given (scripts/demo.sh passes the receiver's log)")
    ch = conn.channel()
    ch.confirm_delivery()
    marker = uuid.uuid4().hex[:8]
    event = {"user": "grace@example.com", "template": "welcome", "channels": ["webhook"],
             "vars": {"name": f"Grace ({marker})"}}
    print(f"  publishing to exchange 'events', routing key 'user.signup': {json.dumps(event)}")
    publish(ch, "events", "user.signup", json.dumps(event).encode(),
            pika.BasicProperties(content_type="application/json"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(WEBHOOK_LOG, encoding="utf-8") as f:
                hits = [json.loads(line) for line in f if marker in line]
        except FileNotFoundError:
            hits = []
        if hits:
            break
        if time.monotonic() > deadline:
            raise StepFailed(f"the receiver got no POST for this event within {timeout:.0f} s")
        time.sleep(0.1)
    hit = hits[0]
    print(f"  the receiver got POST {hit['path']} ({hit['content_type']}): {hit['body']}")
    print("  (the pipeline's [pipeline.http] allows http://127.0.0.1:8025 and nothing else)")
    ch.close()


def step_denied(conn, timeout: float) -> None:
    ch = conn.channel()
    ch.confirm_delivery()
    url = f"http://169.254.169.254/latest/meta-data/?demo={uuid.uuid4().hex[:8]}"
    body = json.dumps({"url": url}).encode()
    print(f"  asking the thumbnail pipeline to fetch {url}")
    print("  (the cloud metadata address; the pipeline has no [pipeline.http] at all)")
    publish(ch, "uploads", "image", body, pika.BasicProperties(content_type="application/json"))
    deadline = time.monotonic() + timeout
    while True:
        method, props, dl_body = ch.basic_get("images.dlq", auto_ack=True)
        if method is None:
            if time.monotonic() > deadline:
                raise StepFailed(f"nothing in images.dlq within {timeout:.0f} s")
            time.sleep(0.2)
            continue
        if dl_body == body:
            break
        # An older dead letter (an earlier run): skip it.
    reason = header_text((props.headers or {}).get("x-warren-reason"))
    print(f"  images.dlq holds it with x-warren-reason: {reason}")
    print("  warren refused the request before connecting, logged it once and counted it")
    print("  in warren_http_denied_total{pipeline=\"thumbnail\"}")
    if "denied" not in reason:
        raise StepFailed(f"expected a denial in the reason, got {reason!r}")
    ch.close()


def step_dead_letter(conn, timeout: float) -> None:
    ch = conn.channel()
    ch.confirm_delivery()
    props, body = rpc_call(ch, "rpc_queue", b"abc", timeout)
    print(f"  fib('abc') -> reply: {body.decode('utf-8', 'replace')!r}")
    print_headers(props.headers, prefix="x-warren-error")
    if not body.startswith(b"error:"):
        raise StepFailed(f"expected an error reply, got {body!r}")
    # The error reply is sent with the dead-letter copy, so the copy is in the DLQ by now.
    deadline = time.monotonic() + timeout
    while True:
        method, dl_props, dl_body = ch.basic_get("rpc_queue.dlq", auto_ack=True)
        if method is None:
            if time.monotonic() > deadline:
                raise StepFailed(f"nothing in rpc_queue.dlq within {timeout:.0f} s")
            time.sleep(0.2)
            continue
        if dl_body == b"abc":
            break
        # An older dead letter (an earlier run): skip it.
    reason = (dl_props.headers or {}).get("x-warren-reason")
    print(f"  rpc_queue.dlq holds {dl_body!r} with x-warren-reason: {header_text(reason)}")
    print_headers(dl_props.headers, prefix="x-warren-")
    if reason is None:
        raise StepFailed("the dead-lettered message has no x-warren-reason header")
    ch.close()


STEPS = {
    "fib": ("RPC: fib(30) through rpc_queue, answer via direct reply-to", step_fib),
    "thumbnail": ("Work queue + fanout: a 640x400 PNG in, a thumbnail out", step_thumbnail),
    "notify": ("Topic routing: one signup event, one notification per channel", step_notify),
    "webhook": ("Outbound HTTP: the notify plugin POSTs a webhook to a local receiver", step_webhook),
    "denied": ("Outbound HTTP denied: a message asks for a host its pipeline does not allow", step_denied),
    "dead-letter": ("Poison message: fib('abc') gets an error reply and lands in the DLQ", step_dead_letter),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds each step may take")
    ap.add_argument("--only", default=",".join(STEPS), help="comma-separated steps to run")
    ap.add_argument("--webhook-log", help="file where scripts/demo/receiver.py records POSTs")
    args = ap.parse_args()
    global WEBHOOK_LOG
    WEBHOOK_LOG = args.webhook_log
    wanted = [s for s in args.only.split(",") if s]
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")

    try:
        conn = pika.BlockingConnection(pika.URLParameters(args.url))
    except pika.exceptions.AMQPError as e:
        print(f"cannot connect to {args.url}: {e!r}", file=sys.stderr)
        return 1

    failed = []
    for i, name in enumerate(wanted, 1):
        title, run = STEPS[name]
        print(f"\n--- ({i}/{len(wanted)}) {title}", flush=True)
        try:
            if conn.is_closed:
                conn = pika.BlockingConnection(pika.URLParameters(args.url))
            run(conn, args.timeout)
            print("  ok", flush=True)
        except StepFailed as e:
            print(f"  FAILED: {e}", flush=True)
            failed.append(name)
        except pika.exceptions.AMQPError as e:
            print(f"  FAILED: broker error: {e!r}", flush=True)
            failed.append(name)
    if conn.is_open:
        conn.close()

    print()
    if failed:
        print(f"demo client: {len(failed)} of {len(wanted)} steps failed: {', '.join(failed)}")
        return 1
    print(f"demo client: all {len(wanted)} steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
