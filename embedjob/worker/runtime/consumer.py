"""The worker's Celery consumer: Celery's own, surviving a broker connection loss with shards in flight.

Celery 5.7 closes the broken broker connection right after ``connection.collect()`` when the
connection is lost (``Consumer.on_connection_error_after_connected``). With kombu's Redis transport,
collect() has already detached the transport, and the close runs the channel's restore of unacked
messages (our ``acks_late`` shards in flight) through it: ``AttributeError: 'NoneType' object has no
attribute 'hostname'``. That error is not a connection error, so it escapes the cleanup and Celery
stops the worker ("Unrecoverable error") on every Redis restart that finds a shard in flight.

Here the failed cleanup is logged and the consumer reconnects as it would have. Nothing is lost by
skipping that restore: the shards in flight keep running and acknowledge their messages on the new
connection; a message whose worker does die is restored by the broker's visibility timeout and the
operator's lease and lost-message checks.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger("embedjob.worker")


class Consumer(CeleryConsumer):
    def on_connection_error_after_connected(self, exc: Any) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as e:
            log.warning("broker connection lost (%s); closing it failed in kombu (%s); reconnecting", exc, e)
            self.connection = None
