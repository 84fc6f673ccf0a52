"""The opt-in fast path (``spec.inference.preprocessing: fast``) and its bounds against the exact one.

CPU: JPEGs decoded at reduced scale in the DCT domain, never below 2x the target, then the exact
resize and crop with the original geometry. CUDA: nvJPEG + resize/crop on the device; that code runs
here on the CPU with a Pillow decoder standing in for nvJPEG (torchvision is not installed here), so
only the decode call itself is left to the GPU check (scripts/gpu-check.sh)."""

from __future__ import annotations

import io
import json
import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from embedjob.bench.synth import synthetic_jpegs
from embedjob.contract import EmbedOptions
from embedjob.storage import Storage
from embedjob.worker.datapath import batch as batch_module
from embedjob.worker.datapath import shard as pipeline
from embedjob.worker.datapath.batch import PreparedStream
from embedjob.worker.datapath.crop import Crop, EncodedJpeg, Rejected, draft_request, prepare_image
from embedjob.worker.datapath.decode_pool import DecodePool
from embedjob.worker.datapath.engine import DEVICE_JPEG_PATH, InferenceEngine
from embedjob.worker.datapath.gpu_decode import DeviceDecodeUnavailable, device_crops, nvjpeg_decoder
from embedjob.worker.model.embedder import Embedder
from embedjob.worker.model.load import clear_cache, load_embedder
from tests import shards

MAX_PIXELS = 10**8


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _crop(data: bytes, mode: str) -> Crop:
    out = prepare_image(data, MAX_PIXELS, mode)
    assert isinstance(out, Crop), out
    return out


def _realistic_jpegs() -> list[bytes]:
    """Photo-like JPEGs (the benchmark's generator) at the sizes the fast path changes, plus a
    progressive and a grey one."""
    jpegs = synthetic_jpegs("1mp", 3, seed=11)
    big = io.BytesIO()
    Image.open(io.BytesIO(synthetic_jpegs("1mp", 1, seed=12)[0])).resize((2400, 1600)).save(big, "JPEG", quality=92)
    prog = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).save(prog, "JPEG", quality=85, progressive=True)
    grey = io.BytesIO()
    Image.open(io.BytesIO(jpegs[1])).convert("L").rotate(90, expand=True).save(grey, "JPEG", quality=90)
    # And the worst case for a DCT-domain downscale: white noise and hard edges everywhere.
    noisy = shards.encode(shards.rgb(1200, 900, seed=5), "JPEG", quality=90)
    return [*jpegs, big.getvalue(), prog.getvalue(), grey.getvalue(), noisy]


def test_draft_never_goes_below_twice_the_target():
    for width, height in ((1200, 900), (900, 1200), (4000, 3000), (897, 2000), (5000, 500)):
        req = draft_request(width, height)
        assert min(req) == 448 and req[0] / req[1] == pytest.approx(width / height, rel=0.01)
        img = Image.open(io.BytesIO(shards.encode(Image.new("RGB", (width, height), "gray"), "JPEG")))
        img.draft(None, req)
        assert min(img.size) >= 448


def test_cpu_fast_path_stays_within_30_db_of_exact_on_realistic_jpegs():
    for data in _realistic_jpegs():
        exact, fast = _crop(data, "exact"), _crop(data, "fast")
        assert fast.path == "cpu-draft" and exact.path == "exact"
        assert (fast.width, fast.height) == (exact.width, exact.height)  # the original size, for the metadata
        assert psnr(exact.pixels, fast.pixels) >= 30.0
        assert np.mean(np.abs(exact.pixels.astype(int) - fast.pixels.astype(int))) < 3.0


def test_cpu_fast_path_is_exact_where_no_downscale_is_possible():
    # Short side below 2x2x224: no DCT scale keeps it at 2x the target, so nothing changes.
    for data in (*synthetic_jpegs("500x375", 2), shards.encode(shards.rgb(895, 1400), "JPEG"),
                 shards.encode(shards.rgb(600, 600), "PNG")):
        fast = _crop(data, "fast")
        assert fast.path == "exact"
        np.testing.assert_array_equal(fast.pixels, _crop(data, "exact").pixels)


def test_cpu_fast_path_keeps_the_failures_of_the_exact_one():
    truncated = synthetic_jpegs("1mp", 1)[0][:20000]
    for data in (b"", b"garbage", truncated):
        exact, fast = prepare_image(data, MAX_PIXELS, "exact"), prepare_image(data, MAX_PIXELS, "fast")
        assert isinstance(exact, Rejected) and isinstance(fast, Rejected)
    big = synthetic_jpegs("1mp", 1)[0]
    assert "too many pixels" in prepare_image(big, 1000, "fast").reason


# -- the device path, run on the CPU ----------------------------------------------------------------------
def pil_decoder(datas: list[bytes], device: torch.device) -> list:
    """Stands in for nvJPEG: same output contract (uint8 [3, H, W] on the device, or the exception)."""
    out = []
    for d in datas:
        try:
            img = Image.open(io.BytesIO(d))
            img.load()
            out.append(torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).to(device))
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out


def test_device_resize_and_crop_stay_within_30_db_of_exact():
    datas = [*_realistic_jpegs(), *synthetic_jpegs("500x375", 2), shards.encode(shards.rgb(301, 517, 2), "JPEG")]
    crops = device_crops(datas, torch.device("cpu"), pil_decoder)
    for data, crop in zip(datas, crops, strict=True):
        assert crop.dtype == torch.uint8 and tuple(crop.shape) == (224, 224, 3)
        assert psnr(_crop(data, "exact").pixels, crop.numpy()) >= 30.0


def test_device_resize_and_crop_follow_the_models_transform():
    """CLIP at 336 px (short side 336, center crop) and SigLIP's squash at 224 and 384 px (the whole
    image to a square): the device's crops have the model's size and stay within 30 dB of its exact
    transform, on photo-like, progressive, grey, portrait and odd-sized JPEGs."""
    from embedjob.worker.model.random_weights import siglip_processor_config
    from embedjob.worker.model.transform import transform_from_config

    datas = [*_realistic_jpegs(), *synthetic_jpegs("500x375", 2), shards.encode(shards.rgb(301, 517, 2), "JPEG")]
    for transform in (transform_from_config("clip", None, 336), transform_from_config("siglip", None, 224),
                      transform_from_config("siglip", siglip_processor_config(384), 384)):
        crops = device_crops(datas, torch.device("cpu"), pil_decoder, transform)
        for data, crop in zip(datas, crops, strict=True):
            exact = prepare_image(data, MAX_PIXELS, "exact", transform=transform)
            assert isinstance(exact, Crop) and exact.pixels.shape == (transform.crop, transform.crop, 3)
            assert crop.dtype == torch.uint8 and tuple(crop.shape) == exact.pixels.shape
            assert psnr(exact.pixels, crop.numpy()) >= 30.0, (transform.id, len(data))


def test_decode_workers_leave_only_complete_rgb_or_grey_jpegs_for_the_device():
    jpeg = synthetic_jpegs("500x375", 1)[0]
    item = prepare_image(jpeg, MAX_PIXELS, "fast", device_jpeg=True)
    assert isinstance(item, EncodedJpeg) and (item.width, item.height) == (500, 375) and item.data == jpeg
    cmyk = shards.encode(shards.rgb(300, 200).convert("CMYK"), "JPEG")
    for data in (cmyk, shards.encode(shards.rgb(300, 200), "PNG")):  # the CPU path for these
        assert isinstance(prepare_image(data, MAX_PIXELS, "fast", device_jpeg=True), Crop)
    # A truncated JPEG (no end marker) too, where it is recorded as the exact path records it.
    truncated = prepare_image(jpeg[:-200], MAX_PIXELS, "fast", device_jpeg=True)
    assert isinstance(truncated, Rejected) and "truncated" in truncated.reason
    assert "too many pixels" in prepare_image(jpeg, 1000, "fast", device_jpeg=True).reason


@pytest.fixture(scope="module")
def embedder(tiny_clip_dir):
    clear_cache()
    return load_embedder(str(tiny_clip_dir), device="cpu", precision="fp32")


def test_engine_puts_device_decoded_images_in_their_places(embedder):
    jpegs = synthetic_jpegs("mix", 4, seed=3)
    exact = [_crop(d, "exact").pixels for d in jpegs]
    # nvJPEG refuses the third one (a decode error on the device): it takes the CPU path, and the
    # garbage one fails there too and is left out.
    refusing = lambda datas, device: [  # noqa: E731
        ValueError("nvjpeg: unsupported") if d is jpegs[2] else x
        for d, x in zip(datas, pil_decoder(datas, device), strict=True)]
    items = [exact[0], EncodedJpeg(jpegs[1], 0, 0, 0.0), EncodedJpeg(jpegs[2], 0, 0, 0.0),
             EncodedJpeg(b"\xff\xd8garbage\xff\xd9", 0, 0, 0.0), exact[3]]
    with InferenceEngine(embedder, batch_size=8, jpeg_decoder=refusing, max_pixels=MAX_PIXELS) as engine:
        result = engine.submit(items).result(timeout=60)
    assert set(result.rejected) == {3} and result.rows.shape == (4, 32)
    assert result.paths == {1: DEVICE_JPEG_PATH, 2: "exact"}  # 500x375: the CPU fast path is exact there
    reference = embedder.embed_uint8(np.stack([exact[0], exact[1], exact[2], exact[3]]))
    cos = (result.rows * reference).sum(1)
    assert cos[0] == pytest.approx(1, abs=1e-6) and cos[3] == pytest.approx(1, abs=1e-6)  # host crops as given
    assert cos[2] == pytest.approx(1, abs=1e-6)  # the CPU fallback
    assert cos[1] > 0.99  # decoded and resized "on the device"


def test_pipeline_fast_path_on_the_device_route(embedder, tmp_path, monkeypatch):
    """The whole shard through the device route (the decoder stands in for nvJPEG): rows stay aligned
    with the metadata, failures keep tar order, the manifest says what was done."""
    monkeypatch.setattr(pipeline, "device_jpeg_decoder", lambda options, model: pil_decoder)
    spec = shards.varied_shard()
    tar = spec.write(tmp_path / "varied.tar")
    options = EmbedOptions(batch_size=4, num_threads=2, preprocessing="fast")
    result = pipeline.embed_shard(str(tar), str(tmp_path / "fast"), embedder, options)
    exact = pipeline.embed_shard(str(tar), str(tmp_path / "exact"), embedder, EmbedOptions(batch_size=4, num_threads=2))
    assert (result.images, result.failed) == (exact.images, exact.failed) == (22, 4)
    manifest = json.loads((tmp_path / "fast" / "_manifests" / "varied.json").read_text())
    assert manifest["preprocessing"] == "embedjob-fast-v1"
    assert manifest["preprocessing_paths"][DEVICE_JPEG_PATH] >= 5  # the RGB/grey JPEGs of the varied shard
    assert sum(manifest["preprocessing_paths"].values()) == 22
    assert [f["key"] for f in manifest["failed"]] == spec.failed_keys
    fast_emb = np.load(tmp_path / "fast" / "img_emb" / "varied.npy").astype(np.float32)
    exact_emb = np.load(tmp_path / "exact" / "img_emb" / "varied.npy").astype(np.float32)
    assert (fast_emb * exact_emb).sum(1).min() > 0.99  # same images, same rows


class _CountingPool(DecodePool):
    """The real pool, counting the image bytes that cross the pipes: sent to it and sent back."""

    sent_bytes = reply_bytes = 0

    def submit_chunk(self, header, payload=b""):  # noqa: ANN001, ANN201
        self.sent_bytes += len(payload)
        future = super().submit_chunk(header, payload)

        def count(f) -> None:  # noqa: ANN001
            if not f.cancelled() and f.exception() is None:
                self.reply_bytes += len(f.result()[1])

        future.add_done_callback(count)
        return future


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_device_jpegs_reach_the_main_process_as_views_of_their_slot_not_through_the_pipes(kind, tmp_path,
                                                                                          monkeypatch):
    """The fast path on CUDA: a decode worker leaves each checked JPEG's bytes in its batch slot's
    JPEG room, so the main process gets them without a byte through a pipe or a copy. A JPEG that
    does not fit in what its batch left of the room comes back through the pipe, and is the same."""
    spec = shards.varied_shard()
    tar = spec.write(tmp_path / "varied.tar")
    members = spec.members_by_key()
    options = EmbedOptions(batch_size=4, num_threads=2, preprocessing="fast")
    pool = _CountingPool(2, kind)

    def jpegs() -> dict[str, tuple[type, bytes]]:
        out = {}
        with PreparedStream(str(tar), Storage(), pool, options, device_jpeg=True) as stream:
            for b in stream.batches():
                out.update({b.rows[i].key: (type(j.data), bytes(j.data)) for i, j in b.jpegs.items()})
                stream.release(b.slot)
        return out

    try:
        roomy = jpegs()
        assert pool.sent_bytes == pool.reply_bytes == 0
        assert len(roomy) >= 5 and {t for t, _ in roomy.values()} == {np.ndarray}
        assert {k: data for k, (_, data) in roomy.items()} == {k: members[k] for k in roomy}
        # A room of about one of these JPEGs per batch of 4: the others come back in the replies.
        sizes = sorted(len(data) for _, data in roomy.values())
        monkeypatch.setattr(batch_module, "JPEG_ROOM_PER_ROW", sizes[len(sizes) // 2] // 4)
        tight = jpegs()
        assert {k: data for k, (_, data) in tight.items()} == {k: data for k, (_, data) in roomy.items()}
        assert {t for t, _ in tight.values()} == {np.ndarray, bytes}
        assert pool.sent_bytes == 0
        assert pool.reply_bytes == sum(len(data) for t, data in tight.values() if t is bytes)
    finally:
        pool.shutdown()


def test_device_route_rows_do_not_depend_on_the_jpeg_room(embedder, tmp_path, monkeypatch):
    """Whether a JPEG reached the device-decode stage in its slot or through the pipe, the shard's
    rows are the same, bit for bit."""
    monkeypatch.setattr(pipeline, "device_jpeg_decoder", lambda options, model: pil_decoder)
    tar = shards.varied_shard().write(tmp_path / "varied.tar")
    options = EmbedOptions(batch_size=4, num_threads=2, preprocessing="fast")
    roomy = pipeline.embed_shard(str(tar), str(tmp_path / "roomy"), embedder, options)
    monkeypatch.setattr(batch_module, "JPEG_ROOM_PER_ROW", 2000)  # most do not fit
    tight = pipeline.embed_shard(str(tar), str(tmp_path / "tight"), embedder, options)
    assert (roomy.images, roomy.failed) == (tight.images, tight.failed) == (22, 4)
    for part in ("img_emb/varied.npy",):
        np.testing.assert_array_equal(np.load(tmp_path / "roomy" / part), np.load(tmp_path / "tight" / part))


def test_bench_decode_limit_on_the_device_route_counts_every_image_once(tmp_path, monkeypatch):
    """The benchmark's fast decode limit on CUDA decodes each batch's JPEGs in one device call before
    the slot (and the JPEG room) goes back: every image counted once, refused ones not at all."""
    from embedjob.bench import measure
    from embedjob.worker.datapath import gpu_decode

    calls: list[int] = []

    def counting(datas, device):  # noqa: ANN001, ANN202
        calls.append(len(datas))
        return pil_decoder([bytes(d) for d in datas], device)

    monkeypatch.setattr(gpu_decode, "nvjpeg_decoder", lambda: counting)
    tar = shards.varied_shard().write(tmp_path / "varied.tar")
    options = EmbedOptions(batch_size=4, num_threads=2, preprocessing="fast")
    fast = measure.measure_decode([str(tar)] * 2, Storage(), options, torch.device("cpu"), device_jpeg=True)
    exact = measure.measure_decode([str(tar)] * 2, Storage(), EmbedOptions(batch_size=4, num_threads=2))
    assert (fast["images"], fast["rejected"]) == (exact["images"], exact["rejected"]) == (44, 8)
    assert sum(calls) >= 10 and max(calls) <= 4  # the device JPEGs, a batch per call


def test_fast_path_on_cuda_without_torchvision_names_the_field(tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed here")
    with pytest.raises(DeviceDecodeUnavailable, match="spec.inference.preprocessing"):
        nvjpeg_decoder()
    # A CUDA worker asked for the fast path fails the shard before reading it, and writes nothing.
    gpu = Embedder(lambda x: x, model_id="x", revision=None, dim=8, device=torch.device("cuda"),
                   dtype=torch.float16)
    tar = shards.simple_shard(3).write(tmp_path / "s.tar")
    with pytest.raises(DeviceDecodeUnavailable, match="spec.inference.preprocessing"):
        pipeline.embed_shard(str(tar), str(tmp_path / "out"), gpu, EmbedOptions(preprocessing="fast"))
    assert not (tmp_path / "out").exists()
    # Every model takes the device route, whatever its transform (SigLIP's squash here).
    from embedjob.worker.model.transform import transform_from_config

    gpu.transform = transform_from_config("siglip", None, 224)
    with pytest.raises(DeviceDecodeUnavailable, match="spec.inference.preprocessing"):
        pipeline.device_jpeg_decoder(EmbedOptions(preprocessing="fast"), gpu)
    assert pipeline.device_jpeg_decoder(EmbedOptions(preprocessing="exact"), gpu) is None


def test_device_decode_stage_keeps_batch_order_over_many_batches_and_leaves_no_thread(embedder):
    """The device-decode thread prepares batch N+1 while the forward thread runs batch N: with more
    batches than host buffers (back-pressure), every batch still comes back in order, each equal to
    embedding the same images decoded and cropped beforehand, and both threads are gone after close."""
    jpegs = synthetic_jpegs("mix", 12, seed=5)
    crops = [c.numpy() for c in device_crops(jpegs, torch.device("cpu"), pil_decoder)]
    batches = [[0, 1, 2], [3], [4, 5, 6, 7], [8, 9], [10, 11], [2, 4, 6]]
    before = threading.active_count()
    engine = InferenceEngine(embedder, batch_size=4, jpeg_decoder=pil_decoder, max_pixels=MAX_PIXELS)
    assert any(t.name == "embedjob-device-decode" for t in threading.enumerate())
    # Mixed: even images as encoded JPEGs for the device, odd ones as host crops.
    futures = [engine.submit([EncodedJpeg(jpegs[i], 0, 0, 0.0) if i % 2 == 0 else crops[i] for i in b])
               for b in batches]
    for b, f in zip(batches, futures, strict=True):
        result = f.result(timeout=60)
        assert result.rejected == {} and result.paths == {k: DEVICE_JPEG_PATH for k, i in enumerate(b) if i % 2 == 0}
        np.testing.assert_allclose(result.rows, embedder.embed_uint8(np.stack([crops[i] for i in b])),
                                   rtol=1e-5, atol=1e-6)
    engine.close()
    assert threading.active_count() == before
