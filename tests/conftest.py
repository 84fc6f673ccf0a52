"""Shared fixtures: REAL Redis and SeaweedFS S3 on free 127.0.0.1 ports (one set per test session,
so sessions run side by side), and a tiny random-weight CLIP saved like the hub checkpoint."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis

from embedjob.dev.services import RedisServer, SeaweedS3
from embedjob.storage import s3_client

S3_KEY = "embedjob-test"
S3_SECRET = "embedjob-test-secret"


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves os.environ as it found it. Worker subprocesses inherit it: a variable one test
    leaves behind (a worker's probe folder, say) changes what every later worker does."""
    saved = dict(os.environ)
    yield
    for k in set(os.environ) - set(saved):
        del os.environ[k]
    for k, v in saved.items():
        if os.environ.get(k) != v:
            os.environ[k] = v


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server):
    """A clean database for each test."""
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.close()
    return redis_server.url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop(grace=3)  # test data need no clean shutdown


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint only through the environment, as in production."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_REGION": "us-east-1",
    }


@pytest.fixture()
def bucket(s3_env):
    """A fresh, empty bucket; returns its name."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A small CLIP with random weights, saved with save_pretrained (safetensors) exactly like the
    hub's openai/clip-vit-large-patch14 folder, so it loads through the same code path."""
    from embedjob.worker.model.random_weights import save_random_clip

    return save_random_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def text_clip_dir(tmp_path_factory) -> Path:
    """A small CLIP whose text tower takes OpenAI CLIP's real token ids (49408), random weights."""
    from embedjob.worker.model.random_weights import save_random_text_clip

    return save_random_text_clip(tmp_path_factory.mktemp("text-clip"))


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def scored_output(tmp_path_factory) -> dict:
    """A 20-shard job run through ``embedjob run`` (run_job) with both score heads (random weights in
    their real shapes) on a 768-wide random CLIP: its output folder, input folder and head files. One
    shard holds a corrupt image (a failed sample). ``output.report``: the run writes report.html."""
    from embedjob.cli.run import run_job
    from embedjob.spec import parse_job
    from embedjob.worker.model.random_weights import save_random_clip, save_random_heads
    from tests.shards import simple_shard

    root = tmp_path_factory.mktemp("scored")
    model = save_random_clip(root / "clip768", projection_dim=768)
    heads = save_random_heads(root / "heads")
    for j in range(20):
        spec = simple_shard(6, seed=j + 1, size=(96, 80), prefix=f"s{j:02d}-")
        if j == 3:
            spec.members.insert(2, ("s03-corrupt.jpg", b"\xff\xd8\xff not a jpeg"))
        spec.write(root / "in" / f"{j:05d}.tar")
    doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob", "metadata": {"name": "scored"},
           "spec": {"input": {"uri": str(root / "in") + "/"}, "output": {"uri": str(root / "out"), "report": True},
                    "model": {"path": str(model)}, "inference": {"device": "cpu", "batchSize": 8},
                    "scores": {k: {"path": str(v)} for k, v in heads.items()}}}
    summary = run_job(parse_job(doc), workers=1, show_progress=False, out=open(os.devnull, "w"))  # noqa: SIM115
    assert summary.ok and summary.shards_failed == 0
    return {"output": root / "out", "input": root / "in", "heads": heads, "images": 120, "failed": 1}
