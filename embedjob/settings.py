"""Process settings, read from the environment once at start-up into one frozen object.

The entry points (``embedjob operator``, ``embedjob worker``, ``embedjob run``, the Celery app) build
it with :func:`load` and pass it in; nothing else reads ``EMBEDJOB_*`` variables. This module is also
the one place outside the entry points that touches the process environment at all: the variables
that libraries read themselves (OpenMP's, prometheus_client's) go through :func:`library_env` and
:func:`set_library_env`. S3 credentials are not settings: boto3 reads ``AWS_*`` from the environment
itself. The Redis password is (it must be composed into the connection): it is kept out of
``repr()``, composed only by :attr:`Settings.redis_connection_url`, and :func:`redact_url` is what
messages show.

Environment variables (defaults in brackets):

================================  ============================================================
``EMBEDJOB_REDIS_URL``            broker and progress store [redis://127.0.0.1:6379/0]
``EMBEDJOB_LEASE_SECONDS``        shard lease, renewed by the worker's heartbeat [120]
``EMBEDJOB_VISIBILITY_TIMEOUT``   broker redelivery of unacknowledged messages, > longest shard [21600]
``EMBEDJOB_RESTORE_INTERVAL``     how often a consumer restores expired unacked messages [kombu's]
``EMBEDJOB_S3_MAX_ATTEMPTS``      botocore attempts per S3 call before a transient failure [8]
``EMBEDJOB_REDIS_WAIT_SECONDS``   how long a task waits for Redis before giving its message back [300]
``EMBEDJOB_MODEL_DIR``            model cache [~/.cache/embedjob/models]
``EMBEDJOB_OPERATOR_INTERVAL``    seconds between status ticks [5]
``EMBEDJOB_OPERATOR_THREADS``     kopf handler threads [8]
``EMBEDJOB_MAX_QUEUED``           most messages of one job waiting in the broker [2000]
``EMBEDJOB_MAX_LEASE_EXPIRIES``   lease expiries before a shard counts as failed [10]
``EMBEDJOB_LOST_MESSAGE_GRACE``   seconds a queued shard may be in no queue before re-enqueue [30]
``EMBEDJOB_METRICS_PORT``         Prometheus ``/metrics`` port of the operator or the worker [0: none]
``EMBEDJOB_METRICS_ADDR``         address the metrics endpoint binds [0.0.0.0]
``EMBEDJOB_LOG_FORMAT``           ``text`` or ``json`` (one object a line; a shard's lines name job,
                                  shard and worker) [text]
``EMBEDJOB_METRICS_DIR``          worker: prometheus_client's multiprocess folder, wiped at start
                                  [a fresh temporary folder]
``EMBEDJOB_REDIS_PASSWORD``       Redis password (AUTH), composed into the Redis and broker connections;
                                  wins over one in the URL; never logged [none]
``EMBEDJOB_REDIS_USERNAME``       Redis ACL user, with the password [none: the default user]
``EMBEDJOB_REDIS_CA_FILE``        ``rediss://`` only: CA bundle the server's certificate must chain to
                                  (verified, hostname checked) [the system's CAs]
``EMBEDJOB_STORAGE_ALLOW_LIST``   JSON ``{"<namespace>" or "*": ["s3://bucket/prefix/", ...]}``: where
                                  jobs may read and write with the workers' credentials (see
                                  embedjob.access) [unset: anywhere]
``EMBEDJOB_ALLOW_LOCAL_PATHS``    ``true``/``false``: may a task name a local input, output or model
                                  path (``embedjob run``); the chart sets false [true]
``EMBEDJOB_SHUTDOWN_DEADLINE``    worker: seconds after SIGTERM after which shards still in flight
                                  are aborted and given back to the queue [15]
``EMBEDJOB_HEALTH_PORT``          worker: ``/healthz`` and ``/readyz`` port [0: none]
``EMBEDJOB_HEALTH_DIR``           worker: the probes' state folder, wiped at start [a fresh temporary folder]
``EMBEDJOB_STALL_SECONDS``        worker: a shard task without progress this long makes it unhealthy [600]
``EMBEDJOB_PRELOAD_MODEL``        worker: model (hub id or path) loaded at start; ready once loaded [none]
``EMBEDJOB_QUEUED_PER_SLOT``      operator: messages waiting in a queue per worker slot consuming it [2]
``EMBEDJOB_MIN_QUEUED``           operator: messages each job may keep waiting, whatever the workers [2]
``EMBEDJOB_STORAGE_ENDPOINTS``    S3 endpoints a job's ``spec.storage.endpoint`` may name besides the
                                  workers' own (``AWS_ENDPOINT_URL``), comma-separated [none]
``EMBEDJOB_MAX_SHARDS``           most shards one job may plan (brace patterns counted before
                                  expanding, listings stopped there) [1000000]
``EMBEDJOB_MAX_MANIFEST_BYTES``   a shard manifest larger than this is not read [16777216]
``EMBEDJOB_MAX_IMAGE_PIXELS``     ceiling on ``spec.inference.maxImagePixels`` [178956970]
``EMBEDJOB_MAX_NUM_THREADS``      ceiling on ``spec.inference.numThreads`` (workers: also their CPUs) [64]
``EMBEDJOB_MAX_RETRIES``          ceiling on ``spec.retries.perShard`` [10]
``EMBEDJOB_MAX_PRIORITY``         ceiling on ``spec.priority`` [10]
``EMBEDJOB_MAX_TAR_HEADER_BYTES`` worker: a GNU long name/link or pax header larger than this is
                                  skipped unread, its member recorded as skipped [65536]
``EMBEDJOB_MAX_SIDECAR_BYTES``    worker: a caption or JSON sidecar larger than this is not read; its
                                  sample is recorded as skipped [1048576]
``EMBEDJOB_MAX_METADATA_BYTES``   worker: sidecar bytes kept per shard; samples past it are recorded
                                  as skipped [67108864]
``EMBEDJOB_MODEL_ALLOW_LIST``     JSON list of hub models jobs may name: ``"org/name"`` (any revision)
                                  or ``"org/name@revision"`` [unset: any]
================================  ============================================================
"""

from __future__ import annotations

import functools
import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    lease_seconds: float = 120.0
    visibility_timeout: int = 6 * 3600
    restore_interval: float | None = None
    s3_max_attempts: int = 8
    redis_wait_seconds: float = 300.0
    model_dir: str = str(Path.home() / ".cache" / "embedjob" / "models")
    operator_interval: float = 5.0
    operator_threads: int = 8
    max_queued: int = 2000
    max_lease_expiries: int = 10
    lost_message_grace: float = 30.0
    metrics_port: int = 0
    metrics_addr: str = "0.0.0.0"
    metrics_dir: str = ""
    log_format: str = "text"
    # Secrets: kept out of repr() (a Settings object in a traceback or a log line shows no password).
    redis_password: str = field(default="", repr=False)
    redis_username: str = ""
    redis_ca_file: str = ""
    # ((namespace or "*", (prefix, ...)), ...); None: no restriction (see embedjob.access)
    storage_allow_list: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    allow_local_paths: bool = True
    shutdown_deadline: float = 15.0
    health_port: int = 0
    health_dir: str = ""
    stall_seconds: float = 600.0
    preload_model: str = ""
    queued_per_slot: float = 2.0
    min_queued: int = 2
    storage_endpoints: tuple[str, ...] = ()
    max_shards: int = 1_000_000
    max_manifest_bytes: int = 16 << 20
    max_image_pixels: int = 178_956_970  # twice the spec's default (Pillow's own error threshold)
    max_num_threads: int = 64
    max_retries: int = 10
    max_priority: int = 10
    max_tar_header_bytes: int = 64 << 10
    max_sidecar_bytes: int = 1 << 20
    max_metadata_bytes: int = 64 << 20
    # (("org/name", "revision" or ""), ...): "" = any revision; None: any model
    model_allow_list: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = cls()

        def num(name: str, default: float, kind: type[int] | type[float] = float) -> float:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                return kind(raw)
            except ValueError as e:
                raise ValueError(f"{name}={raw!r}: expected a number") from e

        restore = env.get("EMBEDJOB_RESTORE_INTERVAL")
        return cls(
            redis_url=env.get("EMBEDJOB_REDIS_URL") or d.redis_url,
            lease_seconds=num("EMBEDJOB_LEASE_SECONDS", d.lease_seconds),
            visibility_timeout=int(num("EMBEDJOB_VISIBILITY_TIMEOUT", d.visibility_timeout, int)),
            restore_interval=num("EMBEDJOB_RESTORE_INTERVAL", 0.0) if restore else None,
            s3_max_attempts=int(num("EMBEDJOB_S3_MAX_ATTEMPTS", d.s3_max_attempts, int)),
            redis_wait_seconds=num("EMBEDJOB_REDIS_WAIT_SECONDS", d.redis_wait_seconds),
            model_dir=env.get("EMBEDJOB_MODEL_DIR") or d.model_dir,
            operator_interval=num("EMBEDJOB_OPERATOR_INTERVAL", d.operator_interval),
            operator_threads=int(num("EMBEDJOB_OPERATOR_THREADS", d.operator_threads, int)),
            max_queued=int(num("EMBEDJOB_MAX_QUEUED", d.max_queued, int)),
            max_lease_expiries=int(num("EMBEDJOB_MAX_LEASE_EXPIRIES", d.max_lease_expiries, int)),
            lost_message_grace=num("EMBEDJOB_LOST_MESSAGE_GRACE", d.lost_message_grace),
            metrics_port=int(num("EMBEDJOB_METRICS_PORT", d.metrics_port, int)),
            metrics_addr=env.get("EMBEDJOB_METRICS_ADDR") or d.metrics_addr,
            metrics_dir=env.get("EMBEDJOB_METRICS_DIR") or d.metrics_dir,
            log_format=_log_format(env.get("EMBEDJOB_LOG_FORMAT") or d.log_format),
            redis_password=env.get("EMBEDJOB_REDIS_PASSWORD") or "",
            redis_username=env.get("EMBEDJOB_REDIS_USERNAME") or "",
            redis_ca_file=env.get("EMBEDJOB_REDIS_CA_FILE") or "",
            storage_allow_list=_allow_list(env.get("EMBEDJOB_STORAGE_ALLOW_LIST")),
            allow_local_paths=_flag("EMBEDJOB_ALLOW_LOCAL_PATHS", env.get("EMBEDJOB_ALLOW_LOCAL_PATHS"), True),
            shutdown_deadline=num("EMBEDJOB_SHUTDOWN_DEADLINE", d.shutdown_deadline),
            health_port=int(num("EMBEDJOB_HEALTH_PORT", d.health_port, int)),
            health_dir=env.get("EMBEDJOB_HEALTH_DIR") or d.health_dir,
            stall_seconds=num("EMBEDJOB_STALL_SECONDS", d.stall_seconds),
            preload_model=env.get("EMBEDJOB_PRELOAD_MODEL") or d.preload_model,
            queued_per_slot=num("EMBEDJOB_QUEUED_PER_SLOT", d.queued_per_slot),
            min_queued=int(num("EMBEDJOB_MIN_QUEUED", d.min_queued, int)),
            storage_endpoints=tuple(e.strip().rstrip("/")
                                    for e in (env.get("EMBEDJOB_STORAGE_ENDPOINTS") or "").split(",") if e.strip()),
            max_shards=int(num("EMBEDJOB_MAX_SHARDS", d.max_shards, int)),
            max_manifest_bytes=int(num("EMBEDJOB_MAX_MANIFEST_BYTES", d.max_manifest_bytes, int)),
            max_image_pixels=int(num("EMBEDJOB_MAX_IMAGE_PIXELS", d.max_image_pixels, int)),
            max_num_threads=int(num("EMBEDJOB_MAX_NUM_THREADS", d.max_num_threads, int)),
            max_retries=int(num("EMBEDJOB_MAX_RETRIES", d.max_retries, int)),
            max_priority=int(num("EMBEDJOB_MAX_PRIORITY", d.max_priority, int)),
            max_tar_header_bytes=int(num("EMBEDJOB_MAX_TAR_HEADER_BYTES", d.max_tar_header_bytes, int)),
            max_sidecar_bytes=int(num("EMBEDJOB_MAX_SIDECAR_BYTES", d.max_sidecar_bytes, int)),
            max_metadata_bytes=int(num("EMBEDJOB_MAX_METADATA_BYTES", d.max_metadata_bytes, int)),
            model_allow_list=_model_allow_list(env.get("EMBEDJOB_MODEL_ALLOW_LIST")),
        )

    @property
    def redis_connection_url(self) -> str:
        """The Redis URL with the password (and user) composed in: what the clients connect with.
        Never log it: :func:`redact_url` is for messages."""
        return compose_redis_url(self.redis_url, self.redis_password, self.redis_username)

    def redis_ssl_options(self) -> dict[str, object] | None:
        """For a ``rediss://`` URL: the certificate checks (always CERT_REQUIRED, hostname checked),
        with the CA bundle when one is set. None for plain ``redis://``."""
        if not self.redis_url.startswith("rediss://"):
            return None
        import ssl

        opts: dict[str, object] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        if self.redis_ca_file:
            opts["ssl_ca_certs"] = self.redis_ca_file
        return opts

    @property
    def expiry_grace(self) -> float:
        """Seconds a "running" shard must stay without a lease before it counts as expired (a worker
        releases its lease a moment before it records the outcome)."""
        return max(1.0, min(5.0, self.lease_seconds / 2))


def compose_redis_url(url: str, password: str = "", username: str = "") -> str:
    """``url`` with ``password`` (and ``username``) as its userinfo; a password given separately wins
    over one already in the URL."""
    if not password:
        return url
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = urllib.parse.quote(username or "", safe="")
    userinfo = f"{user}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for log lines and error messages)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _flag(name: str, raw: str | None, default: bool) -> bool:
    if raw in (None, ""):
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r}: expected true or false")


def _allow_list(raw: str | None) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    """EMBEDJOB_STORAGE_ALLOW_LIST: a JSON object, namespace (or "*") -> list of s3:// prefixes."""
    if raw in (None, ""):
        return None
    name = "EMBEDJOB_STORAGE_ALLOW_LIST"
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{name}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{name}: expected a JSON object {{namespace or \"*\": [\"s3://bucket/prefix/\", ...]}}")
    out = []
    for ns, prefixes in sorted(doc.items()):
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise ValueError(f"{name}[{ns!r}]: expected a list of s3:// prefixes")
        for p in prefixes:
            if p == "*":  # the explicit opt-out: any S3 location (the endpoint stays pinned)
                continue
            if not p.startswith("s3://") or len(p) <= len("s3://"):
                raise ValueError(f"{name}[{ns!r}]: {p!r} is not an s3://bucket/prefix (or \"*\": anywhere)")
            if "{" in p.replace("{namespace}", ""):
                raise ValueError(f"{name}[{ns!r}]: {p!r}: the only placeholder is {{namespace}}")
        out.append((str(ns), tuple(prefixes)))
    return tuple(out)


def _model_allow_list(raw: str | None) -> tuple[tuple[str, str], ...] | None:
    """EMBEDJOB_MODEL_ALLOW_LIST: a JSON list of "org/name" (any revision) or "org/name@revision"."""
    if raw in (None, ""):
        return None
    name = "EMBEDJOB_MODEL_ALLOW_LIST"
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{name}: not valid JSON: {e}") from e
    if not isinstance(doc, list) or not all(isinstance(m, str) and m for m in doc):
        raise ValueError(f"{name}: expected a JSON list of \"org/name\" or \"org/name@revision\"")
    return tuple((m.partition("@")[0], m.partition("@")[2]) for m in doc)


def _log_format(raw: str) -> str:
    if raw not in ("text", "json"):
        raise ValueError(f"EMBEDJOB_LOG_FORMAT={raw!r}: expected text or json")
    return raw


@functools.cache
def load() -> Settings:
    """The process's settings, read from the environment on first use (entry points call this at
    start-up; a bad value fails the start with the variable's name)."""
    return Settings.from_env()


def reload() -> Settings:
    """Read the environment again (tests that change it, or a child process that was handed a new one)."""
    load.cache_clear()
    return load()


def s3_defaults() -> tuple[str | None, str]:
    """(endpoint, region) for S3 clients whose job names none: ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION`` [us-east-1]. Read live, like the credentials boto3 reads itself: they belong
    to the environment's AWS chain, not to embedjob's settings."""
    env = os.environ
    return (env.get("AWS_ENDPOINT_URL") or None,
            env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1")


# -- the environment that libraries read themselves ------------------------------------------------
def library_env(name: str) -> str | None:
    """A variable a library reads on its own (``OMP_NUM_THREADS``, ``PROMETHEUS_MULTIPROC_DIR``):
    what this process (and the children it starts) will hand that library."""
    return os.environ.get(name) or None


def set_library_env(name: str, value: str, *, keep_users: bool = False) -> None:
    """Set a variable a library reads on its own, for this process and the children it starts.
    ``keep_users``: a value the user set already wins."""
    if keep_users:
        os.environ.setdefault(name, value)
    else:
        os.environ[name] = value
