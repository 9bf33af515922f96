"""Peer of the `py_classifier` plugin for warren's benchmark (scenario 9,
polyglot): a Celery app whose task does what the plugin does on its normal
path, in CPython: parse and validate the ticket, classify it with the same
keyword rules, and publish it with `category` and `confidence` added to the
topic exchange `BENCH_EXCHANGE` with routing key `ticket.<category>`.

Publishes wait for the broker's confirm (kombu `confirm_publish`), and tasks
are acknowledged after they ran (acks_late), as warren acks after its
publishes are confirmed. The worker is the prefork pool with one process per
core:

    BENCH_BROKER_URL=amqp://... BENCH_QUEUE=q BENCH_EXCHANGE=x BENCH_PREFETCH=256 \
      BENCH_QUEUE_ARGS='{"x-queue-type": "quorum"}' \
      python -m celery -A celery_classifier worker -P prefork -c 2 -Q q ...

The queue and the exchange already exist (declared by the benchmark).
"""

import json
import logging
import os
import re
import time
from typing import Dict, List, Tuple

from celery import Celery
from kombu import Exchange, Queue

queue = os.environ["BENCH_QUEUE"]
exchange = Exchange(os.environ["BENCH_EXCHANGE"], type="topic", durable=True, no_declare=True)
app = Celery("bench", broker=os.environ["BENCH_BROKER_URL"])
processes = max(1, int(os.environ.get("BENCH_PROCESSES", "1")))
app.conf.update(
    task_queues=[
        Queue(
            queue,
            routing_key=queue,
            no_declare=True,
            queue_arguments=json.loads(os.environ.get("BENCH_QUEUE_ARGS", "{}")),
        )
    ],
    task_default_queue=queue,
    task_acks_late=True,
    task_ignore_result=True,
    # The prefetch window is the multiplier times the pool's processes.
    worker_prefetch_multiplier=max(1, int(os.environ.get("BENCH_PREFETCH", "256")) // processes),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"confirm_publish": True},
)
log = logging.getLogger("classifier")

# The plugin's rules (plugins/python/classifier/classifier.py), unchanged.
DEFAULT_KEYWORDS: Dict[str, List[str]] = {
    "billing": ["invoice", "refund", "charge", "charged", "payment", "billing", "price", "subscription"],
    "outage": ["down", "outage", "error 500", "unavailable", "timeout", "not loading", "crash"],
    "account": ["password", "login", "log in", "2fa", "locked out", "account", "email change"],
    "spam": ["viagra", "crypto giveaway", "click here", "winner", "lottery"],
}


def _pattern(words: List[str]) -> "re.Pattern[str]":
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


RULES = {category: _pattern(words) for category, words in DEFAULT_KEYWORDS.items()}
MAX_CHARS = 10000


class BadInput(Exception):
    pass


def parse(body: str) -> dict:
    try:
        ticket = json.loads(body)
    except json.JSONDecodeError as e:
        raise BadInput(f"invalid JSON: {e.msg}")
    if not isinstance(ticket, dict):
        raise BadInput("ticket must be a JSON object")
    for field in ("subject", "body"):
        if not isinstance(ticket.get(field, ""), str):
            raise BadInput(f'"{field}" must be a string')
    text = f"{ticket.get('subject', '')}\n{ticket.get('body', '')}".strip()
    if not text:
        raise BadInput("ticket has no subject and no body")
    if len(text) > MAX_CHARS:
        raise BadInput("ticket text is too long")
    ticket["_text"] = text
    return ticket


def classify(text: str) -> Tuple[str, float, Dict[str, int]]:
    scores = {category: len(rule.findall(text)) for category, rule in RULES.items()}
    scores = {c: n for c, n in scores.items() if n > 0}
    if not scores:
        return "other", 0.0, {}
    category = max(sorted(scores), key=lambda c: scores[c])
    return category, round(scores[category] / sum(scores.values()), 2), scores


@app.task(name="bench.classify")
def classify_ticket(body: str) -> None:
    try:
        ticket = parse(body)
    except BadInput as e:
        log.warning("%s", e)
        return
    not_before = ticket.get("not_before")
    if isinstance(not_before, int) and not_before > int(time.time() * 1000):
        return
    category, confidence, _ = classify(ticket.pop("_text"))
    log.info("ticket %s: %s (%s)", ticket.get("id", "?"), category, confidence)
    if category == "spam":
        return
    ticket.update(category=category, confidence=confidence)
    with app.producer_pool.acquire(block=True) as producer:
        producer.publish(
            json.dumps(ticket).encode(),
            exchange=exchange,
            routing_key=f"ticket.{category}",
            content_type="application/json",
            content_encoding="binary",
            headers={"x-category": category, "x-confidence": str(confidence)},
            delivery_mode=2,
            declare=[],
            retry=False,
        )
