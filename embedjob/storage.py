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
from typing import TYPE_CHECKING, BinaryIO

from embedjob import settings, uris

if TYPE_CHECKING:
    from embedjob.spec import JobSpec

S3_SCHEME = "s3://"

# Error codes that retrying cannot fix: the credentials, the bucket or the object are wrong.
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
                 "NoCredentialsError", "AllAccessDisabled", "InvalidToken", "ExpiredToken"}
_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "404", "NotFound", "InvalidBucketName"}
# Throttling and server-side errors that outlasted botocore's own retries: worth retrying later.
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "429", "TooManyRequests"}


class StorageError(OSError):
    """An object-store operation failed. The message names the operation and the URI; ``code`` is the
    S3 error code (or the connection error's class name); ``transient`` says whether retrying later
    can help (connection refused, 5xx, throttling) or not (403, missing bucket or object)."""

    def __init__(self, op: str, uri: str, code: str, detail: str, transient: bool) -> None:
        self.op, self.uri, self.code, self.transient, self.detail = op, uri, code, transient, detail
        hint = ""
        if code in _ACCESS_CODES:
            hint = " (check the storage credentials of this process: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        super().__init__(f"{op} {uri}: {detail}{hint}")

    def __reduce__(self) -> tuple:  # survives pickling (process pools, Celery)
        return type(self), (self.op, self.uri, self.code, self.detail, self.transient)

    @property
    def access_denied(self) -> bool:
        return self.code in _ACCESS_CODES

    @property
    def missing(self) -> bool:
        return self.code in _MISSING_CODES


def storage_error(op: str, uri: str, exc: BaseException) -> StorageError:
    """Classify a boto3/botocore (or socket) failure of ``op`` on ``uri``."""
    if isinstance(exc, StorageError):
        return exc
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code = str(response.get("Error", {}).get("Code") or "")
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = response.get("Error", {}).get("Message") or ""
        transient = code in _TRANSIENT_CODES or status >= 500 or status == 429
        if code in _ACCESS_CODES or code in _MISSING_CODES:
            transient = False
        detail = f"{code or 'error'} (HTTP {status})" + (f": {message}" if message and message != code else "")
        return StorageError(op, uri, code or str(status), detail, transient)
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(op, uri, "NoCredentialsError", f"{name}: {exc}", transient=False)
    # Connection refused or reset, timeouts, a stream cut short: the endpoint may come back.
    return StorageError(op, uri, name, f"{name}: {exc}", transient=True)


def _is_missing(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3: endpoint (None = AWS or ``AWS_ENDPOINT_URL``) and region."""

    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> StorageOptions:
        d = d or {}
        return cls(endpoint=d.get("endpoint") or None, region=d.get("region") or None)

    @classmethod
    def from_spec(cls, spec: JobSpec) -> StorageOptions:
        """The options a job's ``spec.storage`` names (the one place they are built from a spec)."""
        return cls(endpoint=spec.storage.endpoint, region=spec.storage.region)

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


def local_path(uri: str) -> str:
    """``uri`` as a local path: anything not ``s3://`` is one, but a URI with another scheme
    (``http://``, ``S3://``, ``file:``) is refused (:class:`~embedjob.uris.UnsafeURI`), never opened as
    a relative path."""
    uris.scheme_of(uri)
    return uri


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
    default_endpoint, default_region = settings.s3_defaults()
    endpoint = options.endpoint or default_endpoint
    region = options.region or default_region
    attempts = settings.load().s3_max_attempts
    cache_key = (endpoint, region, attempts, os.getpid())
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint,
                region_name=region,
                config=Config(
                    retries={"max_attempts": attempts, "mode": "adaptive"},
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
        """A streaming, file-like reader. Memory stays bounded whatever the object's size. S3 errors
        are raised as :class:`StorageError`."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                return _S3Reader(s3_client(self.options), bucket, key)
            except Exception as e:
                raise storage_error("GetObject", uri, e) from e
        return open(local_path(uri), "rb")  # noqa: SIM115 - caller closes

    @staticmethod
    def size_of(f: BinaryIO) -> int | None:
        """The size of what ``f`` (from :meth:`open_read`) reads, when the store said it (S3's
        ContentLength, a local file's size); None when unknown."""
        size = getattr(f, "size", None)
        if isinstance(size, int) and size >= 0:
            return size
        try:
            return os.fstat(f.fileno()).st_size
        except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
            return None

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as f:
            return f.read()

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                s3_client(self.options).head_object(Bucket=bucket, Key=key)
                return True
            except Exception as e:
                if _is_missing(e):
                    return False
                raise storage_error("HeadObject", uri, e) from e
        return os.path.exists(local_path(uri))

    def list(self, prefix: str, suffix: str = "") -> Iterator[str]:
        """Every object URI under ``prefix`` (recursive) ending in ``suffix``, in key order.
        S3 listing is paginated, so it scales to any number of objects."""
        if is_s3(prefix):
            bucket, key = split_s3(prefix)
            paginator = s3_client(self.options).get_paginator("list_objects_v2")
            try:
                for page in paginator.paginate(Bucket=bucket, Prefix=key):
                    for obj in page.get("Contents", []):
                        if obj["Key"].endswith(suffix) and not obj["Key"].endswith("/"):
                            yield f"{S3_SCHEME}{bucket}/{obj['Key']}"
            except Exception as e:
                raise storage_error("ListObjectsV2", prefix, e) from e
            return
        root = Path(local_path(prefix))
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
            try:
                client.upload_fileobj(body, tmp_bucket, tmp_key)
            except Exception as e:
                raise storage_error("PutObject", f"{S3_SCHEME}{tmp_bucket}/{tmp_key}", e) from e
            try:
                client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": tmp_bucket, "Key": tmp_key})
            except Exception as e:
                raise storage_error("CopyObject", uri, e) from e
            finally:
                try:
                    client.delete_object(Bucket=tmp_bucket, Key=tmp_key)
                except Exception:  # noqa: BLE001 - a leftover under _tmp/ is harmless; the copy decides
                    pass
            return
        path = Path(local_path(uri))
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
            try:
                s3_client(self.options).delete_object(Bucket=bucket, Key=key)
            except Exception as e:
                raise storage_error("DeleteObject", uri, e) from e
        else:
            Path(local_path(uri)).unlink(missing_ok=True)


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

    @property
    def size(self) -> int:
        """The object's size (ContentLength), -1 when the response had none."""
        return self._size

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
            except Exception as e:
                failures += 1
                if failures > self.RESUMES:
                    raise storage_error("GetObject", f"{S3_SCHEME}{self._bucket}/{self._key}", e) from e
                time.sleep(min(0.2 * 2**failures, 5.0))
                try:
                    self._resume()
                except Exception as resume_error:
                    err = storage_error("GetObject", f"{S3_SCHEME}{self._bucket}/{self._key}", resume_error)
                    if not err.transient or failures >= self.RESUMES:  # e.g. 412: the object was replaced
                        raise err from resume_error
                continue
            if not data and 0 <= self._pos < self._size:
                # The server closed early without an error: also a dropped connection.
                failures += 1
                if failures > self.RESUMES:
                    raise StorageError("GetObject", f"{S3_SCHEME}{self._bucket}/{self._key}", "StreamEnded",
                                       f"stream ended at byte {self._pos} of {self._size}", transient=True)
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
