"""webhook.py - the `py_webhook` example plugin: POSTs each message's body to
the URL in its pipeline's `[pipeline.config]` (`url`) through
`wasi:http/outgoing-handler`, which warren grants per pipeline
(`[pipeline.http]`). The `wasi-http` file beside this one makes
scripts/build-plugins.sh merge the wasi:http imports into the plugin world;
the bindings then name warren's `types` `warren_plugin_types` and wasi:http's
`wasi_http_types`. docs/plugins-python.md walks through it.

Outcomes:
  2xx                  ack (an RPC request gets {"status": N} as its reply)
  429, 5xx             retry, after Retry-After seconds if the server sent it
  other statuses       dead-letter with the status and the start of the body
  a URL not allowed    dead-letter (HTTP-request-denied: retrying cannot help)
  connection errors    retry (refused, reset, timeouts)
"""

import json
from urllib.parse import urlsplit

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import host, outgoing_handler, streams
from wit_world.imports import wasi_http_types as http
from wit_world.imports.host import Level
from wit_world.imports.warren_plugin_types import (
    Message,
    Outcome,
    Outcome_Ack,
    Outcome_DeadLetter,
    Outcome_Reply,
    Outcome_Retry,
    RetryRequest,
    RpcReply,
)

# Longest piece of an error response kept in a dead-letter reason.
BODY_IN_REASON = 200
# blocking-write-and-flush takes at most 4096 bytes per call.
WRITE_CHUNK = 4096
# warren caps a retry delay at its longest tier; this keeps it a u32.
MAX_DELAY_MS = 86_400_000


def value(result):
    """The payload of a result that is returned (not raised): Ok's value, or
    the Err raised so that one except clause handles every failure."""
    if isinstance(result, Err):
        raise result
    return result.value if isinstance(result, Ok) else result


def post(url: str, body: bytes, content_type: str) -> tuple[int, list[bytes], bytes]:
    """POST `body` to `url`: (status, Retry-After values, response body).
    Raises Err(ErrorCode) when the request fails (denied, refused, timed out)."""
    parts = urlsplit(url)
    scheme = {"http": http.Scheme_Http(), "https": http.Scheme_Https()}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"{url!r} is not an http(s) URL")
    req = http.OutgoingRequest(http.Fields.from_list([("content-type", content_type.encode())]))
    req.set_method(http.Method_Post())
    req.set_scheme(scheme)
    req.set_authority(parts.netloc)
    req.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    out = req.body()
    pending = outgoing_handler.handle(req, None)
    try:
        # The stream is a child of the body: it must be dropped first.
        with out.write() as stream:
            for i in range(0, len(body), WRITE_CHUNK):
                stream.blocking_write_and_flush(body[i : i + WRITE_CHUNK])
        http.OutgoingBody.finish(out, None)
    except Err:
        # The request failed before its body was taken (denied, refused):
        # the response future says why.
        pass
    pending.subscribe().block()
    res = value(value(pending.get()))
    status, retry_after = res.status(), res.headers().get("retry-after")
    data = b""
    with res.consume() as incoming:
        with incoming.stream() as s:
            while True:
                try:
                    data += s.blocking_read(65536)
                except Err as e:
                    if isinstance(e.value, streams.StreamError_Closed):
                        break
                    raise
    return status, retry_after, data


def retry_delay_ms(values: list[bytes]) -> int | None:
    try:
        seconds = int(values[0].decode().strip()) if values else 0
    except ValueError:  # an HTTP date: use the pipeline's backoff
        return None
    return min(seconds * 1000, MAX_DELAY_MS) if seconds > 0 else None


class Handler(exports.Handler):
    def handle(self, msg: Message) -> Outcome:
        url = (host.config("url") or "").strip()
        if not url:
            return Outcome_DeadLetter("no url in [pipeline.config]")
        try:
            status, retry_after, data = post(url, msg.body, msg.content_type or "application/octet-stream")
        except ValueError as e:
            return Outcome_DeadLetter(str(e))
        except Err as e:
            code = e.value
            if isinstance(code, http.ErrorCode_HttpRequestDenied):
                return Outcome_DeadLetter(f"webhook {url}: denied (add its origin to [pipeline.http] allowed_hosts)")
            return Outcome_Retry(RetryRequest(reason=f"webhook {url}: {type(code).__name__}", delay_ms=None))
        host.log(Level.INFO, f"webhook {url} answered {status}")
        if 200 <= status < 300:
            if msg.reply_to is not None:
                answer = json.dumps({"status": status}).encode()
                return Outcome_Reply(RpcReply(body=answer, content_type="application/json", headers=[], publish=[]))
            return Outcome_Ack()
        reason = f"webhook {url} answered {status}"
        if status == 429 or status >= 500:
            return Outcome_Retry(RetryRequest(reason=reason, delay_ms=retry_delay_ms(retry_after)))
        text = data[:BODY_IN_REASON].decode("utf-8", errors="replace")
        return Outcome_DeadLetter(f"{reason}: {text}")
