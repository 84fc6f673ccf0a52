"""embed_shard end to end on real files: local tars and tars in a real S3 (SeaweedFS).

Asserts what a user checks: the three output files, row counts and order, failures with reasons,
resumability, and that nothing partial ever appears under a final name."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.contract import EmbedOptions
from embedjob.storage import Storage, StorageError, s3_client
from embedjob.worker.datapath.batch import decode_workers
from embedjob.worker.datapath.decode_pool import shared_decode_pool
from embedjob.worker.datapath.read import SourceReadError, TarOpenError
from embedjob.worker.datapath.shard import embed_shard
from embedjob.worker.datapath.write import METADATA_SCHEMA
from embedjob.worker.model.load import clear_cache, load_embedder
from tests import shards

FAILURE_REASONS = {
    "zero_bytes": r"empty file",
    "truncated_jpg": r"truncated|cannot decode",
    "garbage": r"not a supported image",
    "bomb": r"decompression bomb|too many pixels",
}


@pytest.fixture(scope="module")
def embedder(tiny_clip_dir):
    clear_cache()
    return load_embedder({"name": "tiny-clip", "revision": "test", "path": str(tiny_clip_dir)}, precision="fp32")


def _opts(**kw) -> EmbedOptions:
    return EmbedOptions(**{"batch_size": 4, "num_threads": 2, **kw})


# -- reading the outputs back, the way a downstream tool would ---------------------------------------
class Outputs:
    def __init__(self, root: str, stem: str, storage: Storage | None = None) -> None:
        self.storage = storage or Storage()
        self.root, self.stem = root.rstrip("/"), stem

    def uri(self, kind: str) -> str:
        # The documented layout, spelled out (not imported) so a change to it breaks this test.
        layout = {"npy": ("img_emb", "npy"), "parquet": ("metadata", "parquet"), "manifest": ("_manifests", "json")}
        sub, ext = layout[kind]
        return f"{self.root}/{sub}/{self.stem}.{ext}"

    def raw(self, kind: str) -> bytes:
        return self.storage.read_bytes(self.uri(kind))

    def exists(self, kind: str) -> bool:
        return self.storage.exists(self.uri(kind))

    def npy(self) -> np.ndarray:
        return np.load(io.BytesIO(self.raw("npy")))

    def table(self):  # noqa: ANN201
        return pq.read_table(io.BytesIO(self.raw("parquet")))

    def manifest(self) -> dict:
        return json.loads(self.raw("manifest"))


def _check_varied_outputs(out: Outputs, spec: shards.ShardSpec, shard_uri: str, dtype: str) -> None:
    emb, table, manifest = out.npy(), out.table(), out.manifest()
    n = len(spec.good_keys)

    assert emb.shape == (n, 32) and emb.dtype == np.dtype(dtype)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

    assert table.schema.equals(METADATA_SCHEMA)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == spec.good_keys  # tar order, bad images leave no gap
    for r in rows:
        assert r["shard"] == shard_uri
        assert r["member"].startswith(r["key"] + ".")
        assert (r["width"], r["height"]) == spec.sizes[r["key"]]
        assert r["caption"] == spec.captions.get(r["key"])
        assert r["json"] == spec.jsons.get(r["key"])

    assert manifest["status"] == "done"
    assert manifest["counts"]["embedded"] == n and manifest["counts"]["failed"] == len(spec.failed_keys)
    assert manifest["counts"]["ignored_members"] == 2  # the .cls and the README
    assert [f["key"] for f in manifest["failed"]] == spec.failed_keys
    for f in manifest["failed"]:
        kind = f["key"].split("_", 1)[1]
        assert re.search(FAILURE_REASONS[kind], f["reason"]), f
        assert f["member"].startswith(f["key"] + ".")
    assert manifest["tar_error"] is None
    assert manifest["model"]["path"] and "id" not in manifest["model"] and "revision" not in manifest["model"]
    assert manifest["preprocessing"] == "openai-clip-reference-v1"
    assert (manifest["dtype"], manifest["dim"]) == (dtype, 32)
    for kind, key in (("npy", "embeddings"), ("parquet", "metadata")):
        data = out.raw(kind)
        assert manifest["files"][key]["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest["files"][key]["bytes"] == len(data)
    assert manifest["embedjob_version"] and manifest["created"]
    assert set(manifest["timings"]) >= {"read", "decode", "preprocess", "inference"}


def test_local_shard_outputs(embedder, tmp_path):
    spec = shards.varied_shard()
    tar = spec.write(tmp_path / "in" / "shard-0001.tar")
    progress: list[int] = []
    result = embed_shard(str(tar), str(tmp_path / "out"), embedder, _opts(), on_progress=progress.append)

    assert (result.status, result.stem, result.images, result.failed) == ("done", "shard-0001", 22, 4)
    assert result.manifest == str(tmp_path / "out" / "_manifests" / "shard-0001.json")
    assert set(result.timings) >= {"read", "decode", "preprocess", "inference", "write", "total"}
    assert progress == sorted(progress) and progress[-1] == 22
    _check_varied_outputs(Outputs(str(tmp_path / "out"), "shard-0001"), spec, str(tar), "float16")
    # Nothing else was written: no temp files next to the outputs.
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["_manifests/shard-0001.json", "img_emb/shard-0001.npy", "metadata/shard-0001.parquet"]


def test_s3_shard_outputs(embedder, bucket):
    spec = shards.varied_shard()
    storage = Storage()
    shard_uri = f"s3://{bucket}/data/part/00007.tar"
    storage.put_atomic(shard_uri, spec.tar_bytes())
    output = f"s3://{bucket}/embeddings"
    result = embed_shard(shard_uri, output, embedder, _opts(dtype="float32"), stem="part/00007", storage=storage)

    assert (result.status, result.images, result.failed) == ("done", 22, 4)
    assert result.manifest == f"{output}/_manifests/part/00007.json"
    _check_varied_outputs(Outputs(output, "part/00007"), spec, shard_uri, "float32")
    assert list(storage.list(f"{output}/_tmp/")) == []


def test_pixel_limit_is_configurable(embedder, tmp_path):
    spec = shards.ShardSpec()
    for key, size in (("a", (300, 300)), ("b", (301, 300)), ("c", (100, 900))):
        spec.members.append((f"{key}.png", shards.encode(shards.rgb(*size), "PNG")))
    tar = spec.write(tmp_path / "s.tar")
    result = embed_shard(str(tar), str(tmp_path / "out"), embedder, _opts(max_image_pixels=90_000))
    manifest = Outputs(str(tmp_path / "out"), "s").manifest()
    assert (result.images, result.failed) == (2, 1)
    assert manifest["failed"] == [
        {"key": "b", "member": "b.png", "reason": "too many pixels: 301x300 = 90300 > limit 90000"}
    ]


def test_empty_shard_still_gets_valid_outputs(embedder, tmp_path):
    spec = shards.ShardSpec(members=[("x.txt", b"caption without an image"), ("y.jpg", b"")])
    tar = spec.write(tmp_path / "empty.tar")
    result = embed_shard(str(tar), str(tmp_path / "out"), embedder, _opts())
    out = Outputs(str(tmp_path / "out"), "empty")
    assert (result.status, result.images, result.failed) == ("done", 0, 1)
    emb = out.npy()
    assert emb.shape == (0, 32) and emb.dtype == np.float16
    table = out.table()
    assert table.num_rows == 0 and table.schema.equals(METADATA_SCHEMA)
    assert out.manifest()["failed"][0]["key"] == "y"


@pytest.mark.parametrize(
    "damage",
    ["cut_in_member_data", "cut_at_member_boundary", "garbage_header"],
)
def test_damaged_tar_keeps_rows_before_the_damage(embedder, tmp_path, damage):
    spec = shards.simple_shard(10, seed=3)
    data = spec.tar_bytes()
    # Byte offsets of each member's header, from a reader of the intact tar.
    import tarfile

    headers = {m.name: m.offset for m in tarfile.open(fileobj=io.BytesIO(data))}
    start = headers["000006.jpg"]
    if damage == "cut_in_member_data":
        data = data[: start + 512 + 3000]
    elif damage == "cut_at_member_boundary":
        data = data[:start]
    else:
        data = data[:start] + b"\x13" * 512 + data[start + 512 :]
    tar = tmp_path / "damaged.tar"
    tar.write_bytes(data)

    result = embed_shard(str(tar), str(tmp_path / "out"), embedder, _opts())
    out = Outputs(str(tmp_path / "out"), "damaged")
    assert result.status == "done" and result.images == 6
    assert out.table().column("key").to_pylist() == spec.good_keys[:6]
    assert out.npy().shape == (6, 32)
    error = out.manifest()["tar_error"]
    assert error and "after 000005.txt" in error


def test_embed_shard_always_embeds_and_replaces_the_outputs(embedder, tmp_path):
    # Whether a shard needs doing is its callers' decision (plans, the task under its lease):
    # called again, embed_shard redoes the shard and the new manifest replaces the old one.
    tar = shards.simple_shard(5).write(tmp_path / "s.tar")
    out = Outputs(str(tmp_path / "out"), "s")
    first = embed_shard(str(tar), out.root, embedder, _opts())
    created = out.manifest()["created"]

    redo = embed_shard(str(tar), out.root, embedder, _opts())
    assert (redo.status, redo.images, redo.manifest) == ("done", 5, first.manifest)
    assert out.manifest()["created"] != created
    assert out.npy().shape == (5, 32) and out.table().num_rows == 5


class _FailingStream(io.RawIOBase):
    """Yields the first ``after`` bytes of ``data``, then fails like a dropped connection."""

    def __init__(self, data: bytes, after: int) -> None:
        self._data, self._pos, self._after = data, 0, after

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._pos >= self._after:
            raise ConnectionResetError("connection reset by peer (injected)")
        n = min(len(b), self._after - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class _ParquetPutFails(Storage):
    """Storage whose upload of the .parquet dies midway through the bytes."""

    def put_atomic(self, uri, data, tmp_root=None):
        if uri.endswith(".parquet"):
            data = data if isinstance(data, bytes) else data.read()
            return super().put_atomic(uri, io.BufferedReader(_FailingStream(data, len(data) // 2)), tmp_root)
        return super().put_atomic(uri, data, tmp_root)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_writer_failure_leaves_nothing_under_final_names(embedder, tmp_path, where, request):
    spec = shards.simple_shard(6)
    if where == "s3":
        bucket = request.getfixturevalue("bucket")
        shard, output = f"s3://{bucket}/in/s.tar", f"s3://{bucket}/out"
        Storage().put_atomic(shard, spec.tar_bytes())
    else:
        shard, output = str(spec.write(tmp_path / "s.tar")), str(tmp_path / "out")
    out = Outputs(output, "s")

    # A first, complete run; then an overwrite whose parquet upload fails.
    embed_shard(shard, output, embedder, _opts())
    with pytest.raises(OSError) as err:
        embed_shard(shard, output, embedder, _opts(overwrite=True), storage=_ParquetPutFails())
    if where == "s3":  # classified, named, and worth a retry
        assert isinstance(err.value, StorageError) and err.value.transient and "PutObject s3://" in str(err.value)
    else:
        assert isinstance(err.value, ConnectionResetError)

    assert not out.exists("manifest")  # not "done": the redo did not finish
    assert not out.exists("npy")  # the new .npy was taken back; never a half-written one
    if where == "s3":
        bucket = output.split("/")[2]
        keys = [o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert [k for k in keys if k.startswith("out/")] == ["out/metadata/s.parquet"]  # the old, complete one
        assert list(Storage().list(f"{output}/_tmp/")) == []
    else:
        left = sorted(str(p.relative_to(output)) for p in Path(output).rglob("*") if p.is_file())
        assert left == ["metadata/s.parquet"]  # the old, complete one; no temp files

    # And the shard is simply redone by the next attempt.
    assert embed_shard(shard, output, embedder, _opts()).status == "done"
    assert out.npy().shape == (6, 32)


def test_source_failure_is_raised_not_recorded_as_a_short_shard(embedder, tmp_path):
    data = shards.simple_shard(8).tar_bytes()

    class DroppingStorage(Storage):
        def open_read(self, uri):
            return io.BufferedReader(_FailingStream(data, len(data) // 2))

    with pytest.raises(SourceReadError, match="connection reset"):
        embed_shard("s3://somewhere/s.tar", str(tmp_path / "out"), embedder, _opts(), storage=DroppingStorage())
    assert not (tmp_path / "out" / "_manifests" / "s.json").exists()


def test_unreadable_shard_raises(embedder, tmp_path, bucket):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x07" * 4096)
    with pytest.raises(TarOpenError):
        embed_shard(str(bad), str(tmp_path / "out"), embedder, _opts())
    with pytest.raises(Exception, match="NoSuchKey|Not Found|404"):
        embed_shard(f"s3://{bucket}/missing.tar", str(tmp_path / "out"), embedder, _opts())
    assert not (tmp_path / "out" / "_manifests").exists()


def test_large_shard_is_streamed_with_bounded_memory(embedder, tmp_path):
    """120 samples of 1 MiB each (a 120 MiB shard): Python-heap peak stays a small fraction of it,
    because at most queue + batch samples are alive at once."""
    n, pad = 120, 1 << 20
    tar = tmp_path / "big.tar"
    import tarfile

    with tarfile.open(tar, "w") as t:
        for i in range(n):
            data = shards.png_with_padding(64, 48, pad, seed=i)
            info = tarfile.TarInfo(f"{i:05d}.png")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert tar.stat().st_size > n * pad

    tracemalloc.start()
    try:
        result = embed_shard(str(tar), str(tmp_path / "out"), embedder, _opts(batch_size=4, num_threads=2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.images == n and result.failed == 0
    print(f"tracemalloc peak {peak / pad:.1f} MiB for a {n} MiB shard")
    assert peak < 24 * pad, f"peak {peak / pad:.1f} MiB for a {n} MiB shard"


def test_model_failure_mid_shard_stops_every_stage(embedder, tmp_path):
    """A failing batch fails the shard cleanly: the error comes out, no manifest, no thread left
    blocked on a full queue."""
    import threading

    from embedjob.worker.model.embedder import Embedder

    calls = []

    def forward(pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("device fell off the bus (injected)")
        return embedder._forward(pixels)

    failing = Embedder(forward, model_id="tiny", revision=None, dim=32, device=embedder.device, dtype=embedder.dtype)
    tar = shards.simple_shard(40).write(tmp_path / "s.tar")
    # The decode pool (and its I/O threads) lives as long as the worker process, by design: start it
    # first, so that what is counted is what this shard leaves behind.
    shared_decode_pool(decode_workers(_opts()))
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="fell off the bus"):
        embed_shard(str(tar), str(tmp_path / "out"), failing, _opts(batch_size=2))
    assert threading.active_count() == before
    assert not (tmp_path / "out" / "_manifests" / "s.json").exists()
    assert not (tmp_path / "out" / "img_emb").exists()
