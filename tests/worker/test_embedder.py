"""The embedder (embedjob.worker.model.embedder): out-of-memory halving, batch-size choice and
tuning, the compiled forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedjob.contract import EmbedOptions
from embedjob.worker.datapath.shard import embed_shard
from embedjob.worker.model.embedder import Embedder
from embedjob.worker.model.load import clear_cache, load_embedder
from embedjob.worker.model.torch_env import OutOfMemoryError
from tests import shards
from tests.worker.test_load import _cosines


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


class _FakeNet:
    """A forward that runs out of memory above ``limit`` images per call, like a full GPU."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls: list[int] = []
        self.proj = torch.randn(3 * 4 * 4, 8, generator=torch.Generator().manual_seed(0))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(pixels.shape[0])
        if pixels.shape[0] > self.limit:
            raise OutOfMemoryError("CUDA out of memory (simulated)")
        return pixels.flatten(1) @ self.proj


def _fake_embedder(net: _FakeNet) -> Embedder:
    return Embedder(net, model_id="fake", revision=None, dim=8, device=torch.device("cpu"), dtype=torch.float32)


def test_out_of_memory_halves_the_batch_and_keeps_the_smaller_size():
    pixels = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = _fake_embedder(_FakeNet(limit=100)).embed(pixels)

    net = _FakeNet(limit=3)
    embedder = _fake_embedder(net)
    out = embedder.embed(pixels)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)  # same rows, same order
    assert net.calls == [10, 5, 2, 2, 2, 2, 2]
    assert embedder.max_batch == 2
    net.calls.clear()
    embedder.embed(pixels[:4])
    assert net.calls == [2, 2]  # the learned size sticks for later batches


def test_out_of_memory_with_a_single_image_is_raised():
    embedder = _fake_embedder(_FakeNet(limit=0))
    with pytest.raises(OutOfMemoryError):
        embedder.embed(torch.randn(4, 3, 4, 4))
    assert embedder.max_batch == 1


def test_auto_batch_size_is_32_on_a_cpu_and_an_explicit_size_is_kept():
    embedder = _fake_embedder(_FakeNet(limit=100))
    assert embedder.resolve_batch_size(0) == 32 and embedder.resolve_batch_size(7) == 7
    embedder.max_batch = 16  # an OOM taught a smaller size: it caps both
    assert embedder.resolve_batch_size(0) == 16 and embedder.resolve_batch_size(64) == 16


class _CropNet(torch.nn.Module):
    """A [B, 3, 224, 224] -> [B, 8] net whose time grows with the batch and that runs out of memory
    above ``limit`` images."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.calls = limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            raise OutOfMemoryError("CUDA out of memory (simulated)")
        return x.mean(dim=(2, 3)).repeat(1, 3)[:, :8] + 1


def test_batch_size_tuning_stops_at_the_first_size_that_does_not_fit():
    net = _CropNet(limit=16)
    embedder = Embedder(net, model_id="fake", revision=None, dim=8, device=torch.device("cpu"), dtype=torch.float32)
    best = embedder.tune_batch_size(candidates=(4, 8, 16, 32, 64), rounds=1)
    assert best in (4, 8, 16)  # 32 ran out of memory: the search ended there
    assert 64 not in net.calls and set(embedder.auto_batch_trials) <= {4, 8, 16}
    assert best in embedder.auto_batch_trials


def test_compiled_forward_matches_eager_pads_short_batches_and_records_its_warm_up(tiny_clip_dir, tmp_path):
    ref = {"name": "x", "path": str(tiny_clip_dir)}
    eager = load_embedder(ref, device="cpu", precision="fp32")
    compiled = load_embedder(ref, device="cpu", precision="fp32", compile="default")
    assert compiled is not eager and compiled.describe()["compile"] == "default"
    assert compiled.warm_up(8) > 0 and compiled.warm_up(8) == 0.0  # once per batch size
    crops = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8))
    assert _cosines(compiled.embed_uint8(crops), eager.embed_uint8(crops)).min() >= 0.9999
    short = compiled.embed_uint8(crops[:3])  # padded to the compiled size of 8, sliced back
    assert short.shape == (3, eager.dim) and _cosines(short, eager.embed_uint8(crops[:3])).min() >= 0.9999

    tar = shards.simple_shard(11).write(tmp_path / "s.tar")
    embed_shard(str(tar), str(tmp_path / "out"), compiled, EmbedOptions(batch_size=8, num_threads=1,
                                                                         compile="default"))
    manifest = json.loads((tmp_path / "out" / "_manifests" / "s.json").read_text())
    assert manifest["model"]["compile"] == "default" and manifest["model"]["compileWarmupSeconds"] > 0
    assert manifest["model"]["attention"] == "sdpa"
    assert (manifest["options"]["batch_size"], manifest["counts"]["embedded"]) == (8, 11)


def test_a_cuda_graph_forward_always_runs_on_the_thread_that_warmed_it_up():
    """reduce-overhead (CUDA graph trees) keeps its state per thread: every call, from the loader's
    thread, the engine's forward thread of each shard, or a caller's, runs on one thread."""
    import threading

    from embedjob.worker.model.embedder import _GraphThread

    graphs = _GraphThread(torch.device("cpu"))
    seen: list[str] = []

    def compiled(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(threading.current_thread().name)
        assert torch.is_inference_mode_enabled()
        return pixels * 2

    x = torch.arange(6.0).reshape(3, 2)
    out = [graphs.call(compiled, x, 2)]  # the warm-up's thread
    for _ in range(3):  # a forward thread per shard
        t = threading.Thread(target=lambda: out.append(graphs.call(compiled, x, 3)))
        t.start()
        t.join()
    assert len(set(seen)) == 1 and seen[0].startswith("embedjob-cudagraphs") and len(seen) == 4
    assert out[0].shape == (2, 2) and torch.equal(out[1], x * 2)
