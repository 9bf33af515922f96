"""classifier.py — the `py_classifier` example plugin: validates support tickets,
sorts them into a category by keyword rules and publishes them to
`<exchange>` with routing key `ticket.<category>`. Built into
plugins/dist/py_classifier.wasm by scripts/build-plugins.sh;
docs/plugins-python.md walks through it.

Input: {"id": "T-1", "subject": "...", "body": "...", "not_before": <unix ms, optional>}

Outcomes:
  publish      the ticket with "category" and "confidence" added, header x-category
  ack          spam is dropped
  dead-letter  not UTF-8, not a JSON object, no text, too long, bad not_before
  retry        a ticket with not_before in the future is not due yet: retried
               after the time left (a transient condition that fixes itself)
  reply        an RPC request (reply-to set) gets the classification back and
               nothing is published: classification as a service
A header `x-fault: trap` raises, to show that an uncaught exception fails only
its own message.

Config (all optional): exchange (default "tickets"), max_chars (default 10000),
keywords.<category> = "word,word,..." adds words to one of the categories
(billing, outage, account, spam); a ticket matching none is "other".
"""

import json
import re
import time
from typing import Dict, List, Optional, Tuple

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.host import Level
from wit_world.imports.types import (
    Message,
    Outcome,
    Outcome_Ack,
    Outcome_DeadLetter,
    Outcome_Publish,
    Outcome_Reply,
    Outcome_Retry,
    Outgoing,
    RetryRequest,
    RpcReply,
)

JSON_TYPE = "application/json"

# Module-level work runs once, at build time: componentize-py snapshots the
# initialised interpreter, so these patterns are already compiled in every
# fresh instance warren creates per message.
DEFAULT_KEYWORDS: Dict[str, List[str]] = {
    "billing": ["invoice", "refund", "charge", "charged", "payment", "billing", "price", "subscription"],
    "outage": ["down", "outage", "error 500", "unavailable", "timeout", "not loading", "crash"],
    "account": ["password", "login", "log in", "2fa", "locked out", "account", "email change"],
    "spam": ["viagra", "crypto giveaway", "click here", "winner", "lottery"],
}


def _pattern(words: List[str]) -> "re.Pattern[str]":
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


DEFAULT_RULES = {category: _pattern(words) for category, words in DEFAULT_KEYWORDS.items()}


class BadInput(Exception):
    """Input that will never be valid: dead-lettered with this message."""


def header(msg: Message, name: str) -> Optional[str]:
    return next((v for k, v in msg.headers if k == name), None)


def rules() -> Dict[str, "re.Pattern[str]"]:
    # host.config is only callable while handling a message, so config-driven
    # rules cannot be precompiled with the defaults.
    result = dict(DEFAULT_RULES)
    for category, words in DEFAULT_KEYWORDS.items():
        extra = host.config(f"keywords.{category}")
        if extra:
            result[category] = _pattern(words + [w.strip() for w in extra.split(",") if w.strip()])
    return result


def parse(msg: Message) -> dict:
    try:
        ticket = json.loads(msg.body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput("body is not UTF-8")
    except json.JSONDecodeError as e:
        raise BadInput(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(ticket, dict):
        raise BadInput("ticket must be a JSON object")
    for field in ("subject", "body"):
        if not isinstance(ticket.get(field, ""), str):
            raise BadInput(f'"{field}" must be a string')
    text = f"{ticket.get('subject', '')}\n{ticket.get('body', '')}".strip()
    if not text:
        raise BadInput("ticket has no subject and no body")
    limit = int(host.config("max_chars") or "10000")
    if len(text) > limit:
        raise BadInput(f"ticket text is {len(text)} characters, more than max_chars {limit}")
    not_before = ticket.get("not_before")
    if not_before is not None and (not isinstance(not_before, int) or isinstance(not_before, bool)):
        raise BadInput('"not_before" must be an integer (unix milliseconds)')
    ticket["_text"] = text
    return ticket


def classify(text: str) -> Tuple[str, float, Dict[str, int]]:
    scores = {category: len(rule.findall(text)) for category, rule in rules().items()}
    scores = {c: n for c, n in scores.items() if n > 0}
    if not scores:
        return "other", 0.0, {}
    category = max(sorted(scores), key=lambda c: scores[c])
    return category, round(scores[category] / sum(scores.values()), 2), scores


def handle(msg: Message) -> Outcome:
    if header(msg, "x-fault") == "trap":
        raise RuntimeError("fault injected by the x-fault header")
    try:
        ticket = parse(msg)
    except BadInput as e:
        host.log(Level.WARN, str(e))
        return Outcome_DeadLetter(str(e))

    not_before = ticket.get("not_before")
    if not_before is not None:
        wait_ms = not_before - int(time.time() * 1000)
        if wait_ms > 0:
            # Not an error of the ticket: it becomes valid by itself, so ask for
            # another attempt after the time left instead of parking it.
            return Outcome_Retry(RetryRequest(reason=f"not due for {wait_ms} ms", delay_ms=min(wait_ms, 2**32 - 1)))

    category, confidence, scores = classify(ticket.pop("_text"))
    ticket_id = str(ticket.get("id", msg.message_id or "?"))
    host.log(Level.INFO, f"ticket {ticket_id}: {category} ({confidence}) after {msg.attempt} attempt(s)")

    if msg.reply_to is not None:
        answer = {"id": ticket_id, "category": category, "confidence": confidence, "scores": scores}
        return Outcome_Reply(
            RpcReply(body=json.dumps(answer).encode(), content_type=JSON_TYPE, headers=[("x-category", category)], publish=[])
        )
    if category == "spam":
        return Outcome_Ack()

    ticket.update(category=category, confidence=confidence)
    out = Outgoing(
        exchange=host.config("exchange") or "tickets",
        routing_key=f"ticket.{category}",
        body=json.dumps(ticket).encode(),
        content_type=JSON_TYPE,
        headers=[("x-category", category), ("x-confidence", str(confidence))],
    )
    return Outcome_Publish([out])


class Handler(exports.Handler):
    """The exported interface `handler`: one class, named after it."""

    def handle(self, msg: Message) -> Outcome:
        return handle(msg)
