"""Reads a Kafka topic from the start with kafka-python, an independent client, and prints one
JSON object per message: key, value, headers, partition, offset.

Usage: kafka_consume.py BOOTSTRAP TOPIC COUNT TIMEOUT_SECONDS
"""

import json
import sys
import time

from kafka import KafkaConsumer

bootstrap, topic, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
consumer = KafkaConsumer(
    topic,
    bootstrap_servers=bootstrap,
    auto_offset_reset="earliest",
    enable_auto_commit=False,
    consumer_timeout_ms=1000,
)
seen = 0
deadline = time.time() + timeout
while seen < count and time.time() < deadline:
    for message in consumer:
        print(
            json.dumps(
                {
                    "key": message.key.decode(),
                    "value": message.value.decode(),
                    "headers": {k: v.decode() for k, v in message.headers},
                    "partition": message.partition,
                    "offset": message.offset,
                }
            ),
            flush=True,
        )
        seen += 1
        if seen >= count:
            break
