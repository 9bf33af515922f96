#!/usr/bin/env python3
"""The demo's webhook receiver: a local HTTP server standing in for Slack or any
service a pipeline exists for. Every POST is answered 204 and appended to LOG as
one JSON line {"path", "content_type", "body"}, which the demo client reads.

  receiver.py PORT LOG
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (the http.server naming)
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        line = {"path": self.path, "content_type": self.headers.get("content-type"), "body": body}
        with open(self.server.log_path, "a", encoding="utf-8") as f:  # type: ignore[attr-defined]
            f.write(json.dumps(line) + "\n")
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        # One line per request on stderr, in the demo's own words.
        sys.stderr.write(f"receiver: {self.command} {self.path}\n")


def main() -> int:
    port, log_path = int(sys.argv[1]), sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", port), Hook)
    server.log_path = log_path  # type: ignore[attr-defined]
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
