"""On a CUDA device only (skipped elsewhere; scripts/gpu-check.sh runs them): the engine's pinned
buffers, copy stream and asynchronous launches give the exact path's rows; nvJPEG's crops stay within
the fast path's bounds; a whole shard through the fast path on the device."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from embedjob.bench.synth import synthetic_jpegs
from embedjob.contract import EmbedOptions
from embedjob.worker.datapath.crop import Crop, prepare_image
from embedjob.worker.datapath.engine import DEVICE_JPEG_PATH, InferenceEngine
from embedjob.worker.datapath.preprocess import reference_crop
from embedjob.worker.datapath.shard import embed_shard
from embedjob.worker.model.load import clear_cache, load_embedder
from tests import shards
from tests.worker.datapath.test_preprocess import REFERENCE_CASES, clip_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture()
def gpu(tiny_clip_dir):
    clear_cache()
    yield load_embedder(str(tiny_clip_dir), device="cuda", precision="fp32")
    clear_cache()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_engine_on_cuda_equals_the_exact_float_path(gpu):
    images = [Image.open(io.BytesIO(shards.varied_images()[n][1])) for n in REFERENCE_CASES]
    crops = [reference_crop(i) for i in images]
    exact = gpu.embed(torch.from_numpy(np.stack([clip_reference(i) for i in images])))
    with InferenceEngine(gpu, batch_size=8) as engine:
        assert engine._crops[0].is_pinned() and engine._rows[0].is_pinned()
        futures = [engine.submit(crops[i : i + 8]) for i in range(0, len(crops), 8)]
        rows = np.concatenate([f.result(timeout=120).rows for f in futures])
    assert _cos(rows, exact).min() >= 0.99999
    assert gpu.busy_seconds() > 0  # measured with CUDA events


def test_asynchronous_launches_keep_their_order(gpu):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8) for n in (16, 3, 16, 16, 7, 16)]
    expected = [gpu.embed_uint8(b) for b in batches]
    with InferenceEngine(gpu, batch_size=16) as engine:
        futures = [engine.submit(list(b)) for b in batches]
        for f, e in zip(futures, expected, strict=True):
            np.testing.assert_allclose(f.result(timeout=120).rows, e, atol=1e-5)


def test_waiting_for_a_batch_sleeps_instead_of_spinning_a_core(gpu):
    """The forward thread waits for every batch; CUDA's default wait spins a CPU the whole time (a core
    the decode processes need). The engine's wait sleeps: the waiting thread's CPU time is a small
    part of the wait."""
    import time

    crops = torch.from_numpy(np.zeros((64, 224, 224, 3), np.uint8)).pin_memory()
    gpu.launch_uint8(crops).wait()  # warm
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of device time queued ahead of the batch (clock cycles)
    handle = gpu.launch_uint8(crops)
    wall, cpu = time.perf_counter(), time.thread_time()
    handle.wait()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    assert wall > 0.2, f"the device finished in {wall:.3f} s: nothing to measure"
    assert cpu < 0.2 * wall, f"the wait used {cpu:.3f} s of CPU in {wall:.3f} s"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_cuda_stays_close(tiny_clip_dir, precision):
    clear_cache()
    crops = np.stack([reference_crop(Image.open(io.BytesIO(j))) for j in synthetic_jpegs("mix", 10)])
    ref = load_embedder(str(tiny_clip_dir), device="cuda", precision="fp32").embed_uint8(crops)
    half = load_embedder(str(tiny_clip_dir), device="cuda", precision=precision)
    with InferenceEngine(half, batch_size=10) as engine:
        rows = engine.submit(list(crops)).result(timeout=120).rows
    assert rows.dtype == np.float32 and _cos(rows, ref).min() >= 0.999
    clear_cache()


@pytest.mark.skipif(not _torchvision(), reason="the fast path on CUDA needs torchvision")
def test_nvjpeg_crops_stay_within_30_db_of_exact():
    from embedjob.worker.datapath.gpu_decode import device_crops, nvjpeg_decoder

    datas = [*synthetic_jpegs("mix", 10, seed=4), shards.encode(shards.rgb(1200, 900, seed=5), "JPEG", quality=90)]
    crops = device_crops(datas + [b"\xff\xd8 not a jpeg \xff\xd9"], torch.device("cuda"), nvjpeg_decoder())
    assert isinstance(crops[-1], BaseException)  # refused: the CPU path takes it
    for data, crop in zip(datas, crops, strict=False):
        exact = prepare_image(data, 10**8, "exact")
        assert isinstance(exact, Crop)
        diff = exact.pixels.astype(np.float64) - crop.cpu().numpy().astype(np.float64)
        assert 10 * math.log10(255.0**2 / max(float(np.mean(diff**2)), 1e-12)) >= 30.0


@pytest.mark.skipif(not _torchvision(), reason="the fast path on CUDA needs torchvision")
def test_device_decode_stream_overlaps_and_keeps_every_batch_in_order(gpu):
    """nvJPEG on the engine's decode stream, the forward on its own: over more batches than host
    buffers, each batch equals its images decoded and cropped beforehand, then embedded."""
    from embedjob.worker.datapath.crop import EncodedJpeg
    from embedjob.worker.datapath.gpu_decode import device_crops, nvjpeg_decoder

    jpegs = synthetic_jpegs("mix", 40, seed=6)
    crops = torch.stack(device_crops(jpegs, torch.device("cuda"), nvjpeg_decoder())).cpu().numpy()
    batches = [list(range(i, min(i + 8, 40))) for i in range(0, 40, 8)] * 3
    with InferenceEngine(gpu, batch_size=8, jpeg_decoder=nvjpeg_decoder(), max_pixels=10**8) as engine:
        futures = [engine.submit([EncodedJpeg(jpegs[i], 0, 0, 0.0) if i % 3 else crops[i] for i in b])
                   for b in batches]
        results = [f.result(timeout=120) for f in futures]
    for b, r in zip(batches, results, strict=True):
        assert r.rejected == {}
        np.testing.assert_allclose(r.rows, gpu.embed_uint8(crops[b]), atol=1e-4)


def _fast_against_exact(embedder, tmp_path) -> None:  # noqa: ANN001
    """The varied shard through the fast path on the device and through the exact path: the same
    images and failures (in tar order), the JPEGs decoded by nvJPEG, the rows within its bounds."""
    spec = shards.varied_shard()
    tar = spec.write(tmp_path / "varied.tar")
    fast = embed_shard(str(tar), str(tmp_path / "fast"), embedder, EmbedOptions(batch_size=8, preprocessing="fast"))
    exact = embed_shard(str(tar), str(tmp_path / "exact"), embedder, EmbedOptions(batch_size=8))
    assert (fast.images, fast.failed) == (exact.images, exact.failed)
    manifest = json.loads((tmp_path / "fast" / "_manifests" / "varied.json").read_text())
    assert manifest["preprocessing_paths"].get(DEVICE_JPEG_PATH, 0) >= 5
    assert [f["key"] for f in manifest["failed"]] == spec.failed_keys
    a = np.load(tmp_path / "fast" / "img_emb" / "varied.npy").astype(np.float32)
    b = np.load(tmp_path / "exact" / "img_emb" / "varied.npy").astype(np.float32)
    assert _cos(a, b).min() > 0.99


@pytest.mark.skipif(not _torchvision(), reason="the fast path on CUDA needs torchvision")
def test_a_shard_through_the_fast_path_on_the_device(gpu, tmp_path):
    _fast_against_exact(gpu, tmp_path)


@pytest.mark.skipif(not _torchvision(), reason="the fast path on CUDA needs torchvision")
@pytest.mark.parametrize("shape", ["vit-l-14-336", "siglip-b-16"])
def test_the_fast_path_on_the_device_follows_each_family(tmp_path, shape):
    """nvJPEG with the model's own resize and crop (336 px CLIP, SigLIP's squash)."""
    from embedjob.worker.model.load import load_or_reuse
    from embedjob.worker.model.random_weights import save_random_shape

    clear_cache()
    embedder, _ = load_or_reuse(str(save_random_shape(tmp_path / shape, shape)), device="cuda", precision="fp32")
    try:
        _fast_against_exact(embedder, tmp_path)
    finally:
        clear_cache()


def test_auto_batch_size_is_tuned_on_the_device(gpu):
    size = gpu.resolve_batch_size(0)
    assert size in gpu.auto_batch_trials and gpu.auto_batch_trials[size] > 0
    assert gpu.resolve_batch_size(0) == size  # timed once per loaded model


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_forward_on_cuda_matches_eager(tiny_clip_dir, tmp_path, mode):
    clear_cache()
    eager = load_embedder(str(tiny_clip_dir), device="cuda", precision="fp16")
    compiled = load_embedder(str(tiny_clip_dir), device="cuda", precision="fp16", compile=mode)
    assert compiled.warm_up(16) > 0
    crops = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8))
    with InferenceEngine(compiled, batch_size=16) as engine:  # the asynchronous launch path
        rows = np.concatenate([engine.submit(list(crops[:16])).result(timeout=120).rows,
                               engine.submit(list(crops[:5])).result(timeout=120).rows])  # padded short batch
    want = np.concatenate([eager.embed_uint8(crops), eager.embed_uint8(crops[:5])])
    assert _cos(rows, want).min() >= 0.999
    tar = shards.simple_shard(21).write(tmp_path / "s.tar")
    result = embed_shard(str(tar), str(tmp_path / "out"), compiled, EmbedOptions(batch_size=16, compile=mode))
    manifest = json.loads((tmp_path / "out" / "_manifests" / "s.json").read_text())
    assert result.images == 21 and manifest["model"]["compile"] == mode
    clear_cache()
