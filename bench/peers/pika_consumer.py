"""Peer for warren's benchmark: a hand-written pika consumer doing the no-op.

Consumes QUEUE with the given prefetch and acks every message, the way the
RabbitMQ tutorials write a worker. Runs until killed.

    python pika_consumer.py AMQP_URL QUEUE PREFETCH
"""

import sys

import pika


def main() -> None:
    url, queue, prefetch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)

    def on_message(ch, method, _properties, _body):
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_consume(queue=queue, on_message_callback=on_message)
    channel.start_consuming()


if __name__ == "__main__":
    main()
