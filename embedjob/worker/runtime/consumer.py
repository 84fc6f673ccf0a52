"""The worker's Celery consumer and its bootstep.

:class:`ConsumerBeat`: liveness of the consumer loop (it touches the health folder) and the
worker's announcements to the operator (embedjob.worker.runtime.announce).

:class:`Consumer`: Celery's own, surviving a broker connection loss with shards in flight.

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

from celery import bootsteps
from celery.worker.consumer import Consumer as CeleryConsumer

from embedjob.worker.runtime import lifecycle
from embedjob.worker.runtime.announce import workers_registry

log = logging.getLogger("embedjob.worker")


class Consumer(CeleryConsumer):
    def on_connection_error_after_connected(self, exc: Any) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as e:
            log.warning("broker connection lost (%s); closing it failed in kombu (%s); reconnecting", exc, e)
            self.connection = None


class ConsumerBeat(bootsteps.StartStopStep):
    """Liveness of the consumer loop: a timer in the loop itself touches the health folder (a wedged
    loop stops touching it) and announces the worker's slots to the operator."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref = None

    def start(self, c: Any) -> None:
        self.beat(c)
        self.tref = c.timer.call_repeatedly(lifecycle.CONSUMER_BEAT, self.beat, (c,), priority=10)

    def beat(self, c: Any) -> None:
        lifecycle.consumer_beat()
        if not lifecycle.shutting_down():
            slots = int(getattr(c.controller, "concurrency", 1) or 1)
            workers_registry.announce(list(c.app.amqp.queues.consume_from or ["embedjob"]), c.hostname, slots)

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
