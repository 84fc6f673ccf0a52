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
