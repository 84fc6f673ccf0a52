"""Log output: plain text (default) or one JSON object per line (``EMBEDJOB_LOG_FORMAT=json``).

While a worker process embeds a shard, every line it logs, from any of its threads (reader, decode
pool, heartbeat), carries the job, the shard, its stem, the attempt and the worker id, so a log
system can follow one shard across retries and workers. The context belongs to the thread that
opened it (a worker process may have two shards in flight); other threads of the process take it
when only one shard is in flight (threads do not inherit contextvars).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_KEYS = ("job", "shard", "stem", "attempt", "worker")

_active: dict[int, dict[str, Any]] = {}  # thread id -> the shard context that thread opened
_lock = threading.Lock()


@contextmanager
def shard_context(**fields: Any) -> Iterator[None]:
    """Fields added to every log record while the block runs (job, shard, stem, attempt, worker).
    A worker process may embed two shards at once (one thread each): a record carries the context of
    the thread that logs it, and a helper thread (reader, heartbeat) the only shard in flight's."""
    me = threading.get_ident()
    with _lock:
        saved = _active.get(me)
        _active[me] = {**(saved or {}), **{k: v for k, v in fields.items() if v is not None}}
    try:
        yield
    finally:
        with _lock:
            if saved is None:
                _active.pop(me, None)
            else:
                _active[me] = saved


def _current() -> dict[str, Any]:
    with _lock:
        mine = _active.get(threading.get_ident())
        if mine is not None:
            return mine
        return next(iter(_active.values())) if len(_active) == 1 else {}


class ContextFilter(logging.Filter):
    """Puts the current shard context on each record (``record.job`` ...; absent outside a shard)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in _current().items():
            if not hasattr(record, k):
                setattr(record, k, v)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        for k in CONTEXT_KEYS:
            v = getattr(record, k, None)
            if v is not None:
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: int | str = logging.WARNING, fmt: str = "text", force: bool = False) -> None:
    """Root logging for an entry point: ``fmt`` "text" or "json" (``force``: replace handlers already
    there, as ``logging.basicConfig`` does)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"EMBEDJOB_LOG_FORMAT={fmt!r}: expected text or json")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level, handlers=[handler], force=force)
