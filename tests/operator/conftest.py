"""The operator's steps against REAL Redis (broker + progress) and SeaweedFS S3, without kopf or
workers (the fixtures of tests/conftest.py)."""

from __future__ import annotations

import uuid

import pytest

from embedjob.broker import make_app
from embedjob.progress import ProgressStore, redis_client


@pytest.fixture()
def env(redis_url, bucket):
    """(Redis client, Celery app, a new job's ProgressStore, an empty bucket)."""
    r = redis_client(redis_url)
    app = make_app(redis_url)
    job = str(uuid.uuid4())
    yield r, app, ProgressStore(r, job), bucket
    r.close()
