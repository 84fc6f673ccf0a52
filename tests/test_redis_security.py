"""Redis with a password and over TLS, for real: a redis-server started with ``requirepass`` (from a
config file, as the chart's Redis gets it from a Secret) refuses a client without the password, while
the operator's and the workers' code paths connect with EMBEDJOB_REDIS_PASSWORD; a redis-server on a
TLS port with a certificate from a CA made here by ``openssl`` is reached through ``rediss://`` only
when the certificate checks out against EMBEDJOB_REDIS_CA_FILE."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest
import redis

from embedjob import settings as settings_module
from embedjob.broker import make_app
from embedjob.contract import TASK_NAME
from embedjob.dev.services import RedisServer, free_port
from embedjob.progress import redis_client
from embedjob.settings import Settings, compose_redis_url, redact_url

PASSWORD = "s3cr:t/p@ss w0rd"  # characters a URL must escape


@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=PASSWORD).start()
    yield server
    server.stop()


@pytest.fixture()
def password_env(secured_redis, monkeypatch):
    monkeypatch.setenv("EMBEDJOB_REDIS_URL", secured_redis.url)
    monkeypatch.setenv("EMBEDJOB_REDIS_PASSWORD", PASSWORD)
    yield settings_module.reload()
    monkeypatch.undo()
    settings_module.reload()


# -- settings ---------------------------------------------------------------------------------------------
def test_password_is_composed_into_the_url_escaped_and_never_shown():
    s = Settings.from_env({"EMBEDJOB_REDIS_URL": "redis://redis:6379/0", "EMBEDJOB_REDIS_PASSWORD": PASSWORD})
    assert s.redis_connection_url == "redis://:s3cr%3At%2Fp%40ss%20w0rd@redis:6379/0"
    assert PASSWORD not in repr(s) and "s3cr" not in repr(s)
    assert redact_url(s.redis_connection_url) == "redis://:***@redis:6379/0"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"
    # The separately given password wins over one left in the URL.
    assert compose_redis_url("redis://:old@h:1/0", "new") == "redis://:new@h:1/0"
    assert Settings.from_env({"EMBEDJOB_REDIS_URL": "redis://h:1/0"}).redis_ssl_options() is None


def test_the_server_command_line_does_not_carry_the_password(secured_redis):
    assert PASSWORD not in " ".join(secured_redis.command())
    assert (secured_redis.config_path.stat().st_mode & 0o077) == 0  # only its owner reads the config


# -- a real redis-server with requirepass ---------------------------------------------------------------------
def test_a_client_without_the_password_is_refused(secured_redis):
    anonymous = redis.Redis.from_url(secured_redis.url)
    with pytest.raises(redis.exceptions.AuthenticationError, match="(?i)authenticat"):
        anonymous.set("k", "v")
    wrong = redis.Redis.from_url(compose_redis_url(secured_redis.url, "wrong"))
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()


def test_operator_and_worker_clients_connect_with_the_password_from_the_environment(password_env, secured_redis):
    # The progress store's client (operator and workers) ...
    client = redis_client()
    assert client.ping() and client.set("embedjob:probe", "1")
    # ... and the broker: a task sent through the Celery app lands in the queue's Redis list.
    app = make_app()
    queue = f"q-{uuid.uuid4().hex[:6]}"
    app.send_task(TASK_NAME, kwargs={"task": {}}, task_id="t-1", queue=queue)
    (raw,) = client.lrange(queue, 0, -1)
    assert json.loads(raw)["headers"]["id"] == "t-1"
    # What Celery would print about its broker hides the password.
    assert PASSWORD not in app.connection().as_uri() and "s3cr" not in app.connection().as_uri()


# -- rediss:// with a CA of our own ---------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl not found")
    d = tmp_path_factory.mktemp("redis-tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=embedjob-test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    tls_port = free_port()
    server = RedisServer(d, password=PASSWORD, extra_args=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(d / "server.crt"), "--tls-key-file",
        str(d / "server.key"), "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no"])
    try:
        server.start()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"this redis-server has no TLS support: {e}")
    yield {"url": f"rediss://127.0.0.1:{tls_port}/0", "ca": str(d / "ca.crt"), "server": server}
    server.stop()


def _tls_settings(url: str, ca: str = "") -> Settings:
    return Settings.from_env({"EMBEDJOB_REDIS_URL": url, "EMBEDJOB_REDIS_PASSWORD": PASSWORD,
                              "EMBEDJOB_REDIS_CA_FILE": ca})


def test_rediss_with_the_ca_file_connects_and_verifies_the_certificate(tls_redis):
    s = _tls_settings(tls_redis["url"], tls_redis["ca"])
    client = redis_client(config=s)
    assert client.ping()
    assert client.connection_pool.connection_kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    # The Celery broker over TLS, certificate required.
    app = make_app(settings=s)
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": tls_redis["ca"]}
    queue = f"q-{uuid.uuid4().hex[:6]}"
    app.send_task(TASK_NAME, kwargs={"task": {}}, task_id="tls-1", queue=queue)
    assert client.llen(queue) == 1


def test_rediss_refuses_a_server_whose_certificate_it_cannot_verify(tls_redis):
    # Without the CA (the system's CAs do not know this one) the handshake fails: no silent fallback.
    client = redis_client(config=_tls_settings(tls_redis["url"]))
    with pytest.raises(redis.exceptions.ConnectionError, match="(?i)certificate verify failed"):
        client.ping()


def test_a_real_worker_over_rediss_with_a_password_embeds_a_shard(tls_redis, s3_env, bucket, tiny_clip_dir, tmp_path):
    """`embedjob worker` consumes over TLS (kombu with broker_use_ssl, CERT_REQUIRED, our CA) with the
    password from the environment, records progress over the same connection and embeds the shard."""
    import os

    from embedjob.contract import EmbedOptions, ShardTask
    from embedjob.progress import ProgressStore
    from tests.shards import simple_shard
    from tests.worker.celery_workers import Workers
    from tests.worker.celery_workers import put_shard as _put_shard
    from tests.worker.celery_workers import wait_state as _wait_state

    env = {**os.environ, **s3_env, "EMBEDJOB_REDIS_URL": tls_redis["url"], "EMBEDJOB_REDIS_PASSWORD": PASSWORD,
           "EMBEDJOB_REDIS_CA_FILE": tls_redis["ca"], "EMBEDJOB_LEASE_SECONDS": "3", "OMP_NUM_THREADS": "1"}
    s = _tls_settings(tls_redis["url"], tls_redis["ca"])
    job = f"job-{uuid.uuid4().hex[:6]}"
    task = ShardTask(job=job, shard=_put_shard(bucket, "in/000.tar", simple_shard(4)), stem="000",
                     output=f"s3://{bucket}/out", model={"name": "x", "revision": None, "path": str(tiny_clip_dir)},
                     options={**EmbedOptions().__dict__, "device": "cpu", "dtype": "float32"})
    workers = Workers(env, f"q-{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        workers.start("tls")
        make_app(settings=s).send_task(TASK_NAME, kwargs={"task": task.to_dict()}, task_id="tls-shard",
                                       queue=workers.queue)
        store = ProgressStore(redis_client(config=s), job)
        _wait_state(store, "000", "succeeded", 180)
        assert store.info("000")["images"] == 4 and store.executions() == {"000": 1}
        assert PASSWORD not in (tmp_path / "tls.log").read_text()
        from embedjob.fairness import live_slots

        assert live_slots(redis_client(config=s), workers.queue) >= 1  # announced over TLS, with the password
    finally:
        workers.stop_all()
