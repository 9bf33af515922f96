"""Peer for warren's benchmark: a Celery app whose one task does nothing.

The benchmark publishes task messages (protocol 2) for `bench.noop` straight
into the queue and runs one worker on it:

    BENCH_BROKER_URL=amqp://... BENCH_QUEUE=q BENCH_PREFETCH=256 \
      BENCH_QUEUE_ARGS='{"x-queue-type": "quorum"}' \
      python -m celery -A celery_noop worker -P solo -Q q ...

The queue already exists (declared by the benchmark with warren's arguments),
so Celery is told not to declare it; its arguments are passed only so that
Celery knows whether it is a quorum queue (which rules out global QoS).
Tasks are acknowledged after they ran (acks_late), like warren does.
"""

import json
import os

from celery import Celery
from kombu import Queue

queue = os.environ["BENCH_QUEUE"]
app = Celery("bench", broker=os.environ["BENCH_BROKER_URL"])
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
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "256")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop(_body):
    return None
