"""Storage against REAL SeaweedFS: streaming reads that survive dropped connections, atomic writes."""

from __future__ import annotations

import os

import pytest
from botocore.exceptions import ClientError
from urllib3.exceptions import ProtocolError

from embedjob.storage import Storage, s3_client


class _DroppingBody:
    """Stands in for a connection that resets: every read fails."""

    def read(self, n: int = -1) -> bytes:
        raise ProtocolError("Connection broken: ConnectionResetError(104, 'Connection reset by peer')")

    def close(self) -> None:
        pass


@pytest.fixture()
def blob(bucket):
    data = os.urandom(3 * 1024 * 1024 + 123)
    s3_client().put_object(Bucket=bucket, Key="big.bin", Body=data)
    return f"s3://{bucket}/big.bin", data


def test_stream_resumes_after_a_dropped_connection(blob):
    uri, data = blob
    with Storage().open_read(uri) as f:
        head = f.read(1_000_001)
        f._body = _DroppingBody()  # the connection drops mid-object
        rest = f.read()
        assert f.resumed == 1
    assert head + rest == data


def test_resume_never_splices_a_replaced_object(blob, bucket):
    uri, data = blob
    with Storage().open_read(uri) as f:
        f.read(1000)
        s3_client().put_object(Bucket=bucket, Key="big.bin", Body=b"new content" * 1000)
        f._body = _DroppingBody()
        with pytest.raises(ClientError, match="PreconditionFailed|412"):
            f.read()


def test_atomic_put_leaves_no_temporaries(bucket, tmp_path):
    storage = Storage()
    storage.put_atomic(f"s3://{bucket}/out/img_emb/a.npy", b"x" * 10, tmp_root=f"s3://{bucket}/out/_tmp")
    assert storage.read_bytes(f"s3://{bucket}/out/img_emb/a.npy") == b"x" * 10
    assert list(storage.list(f"s3://{bucket}/out/_tmp/")) == []
    storage.put_atomic(str(tmp_path / "d" / "a.npy"), b"y" * 10)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["a.npy"]
