"""The engine: uint8 crops to the device, normalised there, forward on its own thread. Its rows equal
the exact float path through the real model loader, in order, with the OOM back-off and errors
delivered, and it leaves no thread behind. Runs on the CPU (the same code as on CUDA, minus pinned
memory and streams)."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from embedjob.worker.datapath.engine import InferenceEngine
from embedjob.worker.datapath.preprocess import normalize, reference_crop
from embedjob.worker.model.embedder import Embedder, normalize_on_device
from embedjob.worker.model.load import clear_cache, load_embedder
from embedjob.worker.model.torch_env import OutOfMemoryError
from tests import shards
from tests.worker.datapath.test_preprocess import REFERENCE_CASES, clip_reference


@pytest.fixture(scope="module")
def embedder(tiny_clip_dir):
    clear_cache()
    return load_embedder({"name": "tiny-clip", "path": str(tiny_clip_dir)}, device="cpu", precision="fp32")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_uint8_with_on_device_normalisation_equals_the_exact_float_path(embedder):
    images = [Image.open(io.BytesIO(shards.varied_images()[name][1])) for name in REFERENCE_CASES]
    crops = [reference_crop(img) for img in images]
    # The exact float path: the reference transform (independent implementation) -> float32 pixels.
    exact = embedder.embed(torch.from_numpy(np.stack([clip_reference(img) for img in images])))
    with InferenceEngine(embedder, batch_size=8) as engine:
        futures = [engine.submit(crops[i : i + 8]) for i in range(0, len(crops), 8)]
        rows = np.concatenate([f.result().rows for f in futures])
    assert rows.shape == exact.shape == (len(images), 32) and rows.dtype == np.float32
    cos = _cosines(rows, exact)
    assert cos.min() >= 0.99999, dict(zip(REFERENCE_CASES, cos, strict=True))
    # The normalisation itself is the reference's arithmetic, element for element.
    on_device = normalize_on_device(torch.from_numpy(np.stack(crops)))
    assert torch.equal(on_device, torch.from_numpy(np.stack([clip_reference(img) for img in images])))
    assert torch.equal(on_device, normalize(np.stack(crops)))


def test_batches_come_back_in_order_and_no_thread_is_left(embedder):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8) for n in (5, 1, 8, 3, 8, 2, 7)]
    expected = [embedder.embed_uint8(b) for b in batches]
    before = threading.active_count()
    engine = InferenceEngine(embedder, batch_size=8)
    futures = [engine.submit(list(b)) for b in batches]  # more batches than host buffers: back-pressure
    for f, e in zip(futures, expected, strict=True):
        np.testing.assert_allclose(f.result(timeout=60).rows, e, rtol=1e-5, atol=1e-6)
    assert engine.busy_seconds > 0  # the model's own time on these batches (the shard's "inference")
    engine.close()
    assert threading.active_count() == before
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(list(batches[0]))
    with InferenceEngine(embedder, batch_size=8) as other, pytest.raises(ValueError, match="batch of 9"):
        other.submit([batches[0][0]] * 9)


class _FakeNet:
    """Runs out of memory above ``limit`` images per call, like a full GPU; fails on call ``fail_on``."""

    def __init__(self, limit: int = 10**9, fail_on: int | None = None) -> None:
        self.limit, self.fail_on, self.calls = limit, fail_on, []
        self.proj = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(pixels.shape[0])
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("device fell off the bus (injected)")
        if pixels.shape[0] > self.limit:
            raise OutOfMemoryError("CUDA out of memory (simulated)")
        return pixels.mean(dim=(2, 3)) @ self.proj


def _fake(net: _FakeNet) -> Embedder:
    return Embedder(net, model_id="fake", revision=None, dim=8, device=torch.device("cpu"), dtype=torch.float32)


def test_out_of_memory_in_the_engine_halves_the_batch():
    crops = np.random.default_rng(1).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    expected = _fake(_FakeNet()).embed_uint8(crops)
    net = _FakeNet(limit=3)
    embedder = _fake(net)
    with InferenceEngine(embedder, batch_size=8) as engine:
        first = engine.submit(list(crops)).result().rows
        net.calls.clear()
        second = engine.submit(list(crops)).result().rows
    np.testing.assert_allclose(first, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(second, expected, rtol=1e-6, atol=1e-6)
    assert embedder.max_batch == 2 and net.calls == [2, 2, 2, 2]  # the learned size sticks


def test_a_failing_batch_fails_its_future_and_the_engine_goes_on():
    crops = list(np.zeros((4, 224, 224, 3), dtype=np.uint8))
    with InferenceEngine(_fake(_FakeNet(fail_on=2)), batch_size=4) as engine:
        futures = [engine.submit(crops) for _ in range(3)]
        assert futures[0].result().rows.shape == (4, 8)
        with pytest.raises(RuntimeError, match="fell off the bus"):
            futures[1].result()
        assert futures[2].result().rows.shape == (4, 8)


def test_only_the_host_crops_runs_of_a_batch_are_copied_to_the_pinned_buffer():
    """On CUDA a batch slot is copied into the pinned buffer by runs of rows that hold a host crop:
    the rows left for device JPEGs (most rows on the fast path) are not copied."""
    from embedjob.worker.datapath.engine import _runs_without

    assert _runs_without(6, {}) == [(0, 6)]
    assert _runs_without(6, dict.fromkeys(range(6))) == []
    assert _runs_without(6, dict.fromkeys([0, 2, 3])) == [(1, 2), (4, 6)]
    assert _runs_without(6, dict.fromkeys([5, 1])) == [(0, 1), (2, 5)]
    for n in range(1, 9):  # every row is in exactly one run or skipped, in order
        for mask in range(2**n):
            skip = {i: None for i in range(n) if mask >> i & 1}
            rows = [i for start, stop in _runs_without(n, skip) for i in range(start, stop)]
            assert rows == [i for i in range(n) if i not in skip]
