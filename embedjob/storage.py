"""Object-store access shared by the worker, the local runner and the operator (torch-free).

One place knows how to reach storage: ``s3://bucket/key`` URIs go through boto3 (endpoint from the
job's ``storage`` block or ``AWS_ENDPOINT_URL``; credentials only from the process environment or
boto3's usual chain, never from the job or a queue message), anything else is a local path.

Writes are "atomic under the final name": a reader never sees a partial object. Locally that is a
temp file in the same folder plus ``os.replace``; on S3 the object is uploaded under a temporary key
in the output's ``_tmp/`` area, then copied to its final key and the temporary key deleted.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3: endpoint (None = AWS or ``AWS_ENDPOINT_URL``) and region."""

    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> StorageOptions:
        d = d or {}
        return cls(endpoint=d.get("endpoint") or None, region=d.get("region") or None)

    def to_dict(self) -> dict:
        return {"endpoint": self.endpoint, "region": self.region}


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URI / path segments with single slashes."""
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client(options: StorageOptions | None = None):  # noqa: ANN201 - boto3 client type is dynamic
    """The one S3 client factory. Clients are cached per (endpoint, region, pid): boto3 clients are
    thread-safe but must not cross a fork."""
    import boto3
    from botocore.config import Config

    options = options or StorageOptions()
    endpoint = options.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    cache_key = (endpoint, region, os.getpid())
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint,
                region_name=region,
                config=Config(
                    retries={"max_attempts": 8, "mode": "adaptive"},
                    s3={"addressing_style": "path"} if endpoint else {},
                    max_pool_connections=32,
                ),
            )
            _clients[cache_key] = client
    return client


class Storage:
    """Read, list and atomically write objects under s3:// URIs or local paths."""

    def __init__(self, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()

    # -- reading -----------------------------------------------------------------------------------
    def open_read(self, uri: str) -> BinaryIO:
        """A streaming, file-like reader. Memory stays bounded whatever the object's size."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return _S3Reader(s3_client(self.options), bucket, key)
        return open(uri, "rb")  # noqa: SIM115 - caller closes

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as f:
            return f.read()

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            from botocore.exceptions import ClientError

            bucket, key = split_s3(uri)
            try:
                s3_client(self.options).head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
        return os.path.exists(uri)

    def list(self, prefix: str, suffix: str = "") -> Iterator[str]:
        """Every object URI under ``prefix`` (recursive) ending in ``suffix``, in key order.
        S3 listing is paginated, so it scales to any number of objects."""
        if is_s3(prefix):
            bucket, key = split_s3(prefix)
            paginator = s3_client(self.options).get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith(suffix) and not obj["Key"].endswith("/"):
                        yield f"{S3_SCHEME}{bucket}/{obj['Key']}"
            return
        root = Path(prefix)
        if root.is_file():
            if str(root).endswith(suffix):
                yield str(root)
            return
        if not root.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(suffix):
                    yield os.path.join(dirpath, name)

    # -- writing -----------------------------------------------------------------------------------
    def put_atomic(self, uri: str, data: bytes | BinaryIO, tmp_root: str | None = None) -> None:
        """Write ``data`` so that ``uri`` appears only complete. ``tmp_root`` is where S3 temporary
        keys go (defaults to a ``_tmp/`` sibling area of the bucket root)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            client = s3_client(self.options)
            if tmp_root:
                tmp_bucket, tmp_prefix = split_s3(tmp_root)
            else:
                tmp_bucket, tmp_prefix = bucket, "_tmp"
            tmp_key = f"{tmp_prefix.rstrip('/')}/{uuid.uuid4().hex}-{key.rsplit('/', 1)[-1]}"
            body = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
            client.upload_fileobj(body, tmp_bucket, tmp_key)
            try:
                client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": tmp_bucket, "Key": tmp_key})
            finally:
                client.delete_object(Bucket=tmp_bucket, Key=tmp_key)
            return
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                if isinstance(data, bytes | bytearray):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client(self.options).delete_object(Bucket=bucket, Key=key)
        else:
            Path(uri).unlink(missing_ok=True)


class _S3Reader(io.RawIOBase):
    """A streaming S3 object as a file object (tarfile's stream mode wants exact ``read`` semantics).

    A connection that drops mid-object (long shards over flaky networks, load-balancer idle
    timeouts) is resumed with a ranged GET from the byte where it stopped, pinned to the first
    response's ETag so a replaced object is never spliced; only after ``RESUMES`` failed resumes
    does the error reach the caller (and the shard is retried as a whole)."""

    RESUMES = 5

    def __init__(self, client, bucket: str, key: str) -> None:  # noqa: ANN001 - boto3 client
        self._client, self._bucket, self._key = client, bucket, key
        resp = client.get_object(Bucket=bucket, Key=key)
        self._body = resp["Body"]
        self._etag = resp.get("ETag")
        self._size = int(resp.get("ContentLength", -1))
        self._pos = 0
        self.resumed = 0

    def readable(self) -> bool:
        return True

    def _resume(self) -> None:
        try:
            self._body.close()
        except Exception:  # noqa: BLE001, S110 - the broken connection may not close cleanly
            pass
        kwargs = {"IfMatch": self._etag} if self._etag else {}
        resp = self._client.get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-", **kwargs)
        self._body = resp["Body"]
        self.resumed += 1

    def readinto(self, b) -> int:  # noqa: ANN001 - buffer protocol
        if len(b) == 0 or self._pos == self._size:
            return 0
        failures = 0
        while True:
            try:
                data = self._body.read(len(b))
            except Exception:
                failures += 1
                if failures > self.RESUMES:
                    raise
                time.sleep(min(0.2 * 2**failures, 5.0))
                self._resume()
                continue
            if not data and 0 <= self._pos < self._size:
                # The server closed early without an error: also a dropped connection.
                failures += 1
                if failures > self.RESUMES:
                    raise OSError(f"s3://{self._bucket}/{self._key}: stream ended at byte {self._pos} of {self._size}")
                self._resume()
                continue
            n = len(data)
            b[:n] = data
            self._pos += n
            return n

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            super().close()
