"""Models by name: CLIP at 224 and 336 px and SigLIP, embedded end to end from random-weight checkpoints in
the hub's shapes (their preprocessing against the references: tests/worker/test_transform.py),
the embeddings against each checkpoint's own get_image_features; anything else refused naming spec.model."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from embedjob.contract import EmbedOptions
from embedjob.worker.datapath.shard import embed_shard
from embedjob.worker.model import ModelLoadError
from embedjob.worker.model.load import clear_cache, load_or_reuse
from embedjob.worker.model.random_weights import save_random_shape, siglip_processor_config
from tests import shards
from tests.worker.test_transform import SIGLIP, _openai_reference


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {shape: save_random_shape(root / shape, shape) for shape in ("vit-b-32", "vit-l-14-336", "siglip-b-16")}


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def _reference_features(shape: str, folder, datas: list[bytes]) -> np.ndarray:
    """The checkpoint's own get_image_features in fp32, on the family's reference pixels."""
    from transformers import CLIPModel, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    images = [Image.open(io.BytesIO(d)) for d in datas]
    if shape.startswith("siglip"):
        model = SiglipModel.from_pretrained(folder).eval()
        pixels = torch.from_numpy(SiglipImageProcessorPil(**siglip_processor_config(224))(
            images=images, return_tensors="np")["pixel_values"])
    else:
        model = CLIPModel.from_pretrained(folder).eval()
        n = model.config.vision_config.image_size
        pixels = torch.from_numpy(np.stack([_openai_reference(i.convert("RGB"), n) for i in images]))
    with torch.inference_mode():
        out = model.get_image_features(pixel_values=pixels)
    feats = getattr(out, "pooler_output", out).numpy().astype(np.float64)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


@pytest.mark.parametrize("shape, dim, size, family", [
    ("vit-b-32", 32, 224, "clip ViT width 64, 2 layers, patch 32"),
    ("vit-l-14-336", 32, 336, "clip ViT width 64, 2 layers, patch 14"),
    ("siglip-b-16", 64, 224, "siglip ViT width 64, 2 layers, patch 16"),
])
def test_each_family_end_to_end(tmp_path, checkpoints, shape, dim, size, family):
    spec = shards.simple_shard(5, seed=3)
    spec.members.insert(2, ("broken.jpg", b"\xff\xd8\xff not a jpeg"))
    tar = spec.write(tmp_path / "s.tar")
    embedder, _ = load_or_reuse(str(checkpoints[shape]), device="cpu", precision="fp32")
    assert embedder.dim == dim and embedder.transform.crop == size
    embed_shard(str(tar), str(tmp_path / "out"), embedder, EmbedOptions(dtype="float32", batch_size=4, num_threads=1))
    emb = np.load(tmp_path / "out" / "img_emb" / "s.npy")
    keys = pq.read_table(tmp_path / "out" / "metadata" / "s.parquet").column("key").to_pylist()
    assert emb.shape == (5, dim) and keys == spec.good_keys
    manifest = json.loads((tmp_path / "out" / "_manifests" / "s.json").read_text())
    assert manifest["model"]["family"] == family and manifest["model"]["imageSize"] == size
    assert manifest["preprocessing"] == manifest["model"]["preprocessing"] == embedder.transform.id
    assert [f["key"] for f in manifest["failed"]] == ["broken"]
    data = spec.members_by_key()
    ref = _reference_features(shape, checkpoints[shape], [data[k] for k in keys])
    cos = (emb.astype(np.float64) * ref).sum(1)
    assert cos.min() >= 0.99999, cos


def test_fast_path_is_exact_for_siglip_and_drafts_for_clip_336(tmp_path, checkpoints):
    """The CPU fast path (DCT draft) serves every CLIP size; SigLIP's squash takes the exact path."""
    spec = shards.simple_shard(3, seed=5, size=(2100, 1500))  # >= 2x 2x336 on the short side
    tar = spec.write(tmp_path / "big.tar")
    for shape, path, pre in [("vit-l-14-336", "cpu-draft", "embedjob-fast-v1:openai-clip-reference-v1@336"),
                             ("siglip-b-16", "exact", "embedjob-fast-v1:" + SIGLIP.id)]:
        clear_cache()
        embedder, _ = load_or_reuse(str(checkpoints[shape]), device="cpu", precision="fp32")
        out = tmp_path / shape
        embed_shard(str(tar), str(out), embedder, EmbedOptions(batch_size=4, num_threads=1, preprocessing="fast"))
        manifest = json.loads((out / "_manifests" / "big.json").read_text())
        assert manifest["preprocessing_paths"] == {path: 3} and manifest["preprocessing"] == pre


@pytest.mark.parametrize("shape", ["vit-l-14-336", "siglip-b-16"])
def test_the_device_route_of_the_fast_path_follows_each_family(tmp_path, checkpoints, monkeypatch, shape):
    """The fast path on CUDA for a model other than OpenAI CLIP at 224 px: its JPEGs are decoded,
    resized and cropped "on the device" (a Pillow decoder stands in for nvJPEG here) with the model's
    own geometry; the rows are those of the exact path, a CMYK JPEG and a PNG still take the CPU path
    (with the model's transform), and the broken one is recorded."""
    from embedjob.worker.datapath import shard as pipeline
    from embedjob.worker.datapath.engine import DEVICE_JPEG_PATH
    from tests.worker.datapath.test_fast_path import pil_decoder

    monkeypatch.setattr(pipeline, "device_jpeg_decoder", lambda options, model: pil_decoder)
    spec = shards.simple_shard(6, seed=4, size=(640, 480))
    spec.members.insert(2, ("broken.jpg", b"\xff\xd8\xff not a jpeg"))
    spec.members.append(("cmyk.jpg", shards.encode(shards.rgb(300, 200, 1).convert("CMYK"), "JPEG")))
    spec.members.append(("png.png", shards.encode(shards.rgb(200, 300, 2), "PNG")))
    tar = spec.write(tmp_path / "s.tar")
    embedder, _ = load_or_reuse(str(checkpoints[shape]), device="cpu", precision="fp32")
    fast = embed_shard(str(tar), str(tmp_path / "fast"), embedder, EmbedOptions(batch_size=4, num_threads=1,
                                                                               preprocessing="fast"))
    exact = embed_shard(str(tar), str(tmp_path / "exact"), embedder, EmbedOptions(batch_size=4, num_threads=1))
    assert (fast.images, fast.failed) == (exact.images, exact.failed) == (8, 1)
    manifest = json.loads((tmp_path / "fast" / "_manifests" / "s.json").read_text())
    assert manifest["preprocessing_paths"][DEVICE_JPEG_PATH] == 6
    assert manifest["preprocessing"] == "embedjob-fast-v1:" + embedder.transform.id
    a = np.load(tmp_path / "fast" / "img_emb" / "s.npy").astype(np.float64)
    b = np.load(tmp_path / "exact" / "img_emb" / "s.npy").astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos[:6].min() > 0.99 and cos[6:].min() > 0.999999  # the CPU path's images are exact


def test_text_outputs_with_every_shape(tmp_path, checkpoints):
    """CLIP shapes with OpenAI CLIP's tokenizer, SigLIP with its own SentencePiece one (tests/worker/
    test_siglip_text.py checks its rows)."""
    for shape, tokenizer in [("vit-l-14-336", "openai-clip-bpe-49408"), ("siglip-b-16", "siglip-sentencepiece")]:
        clear_cache()
        embedder, _ = load_or_reuse(str(checkpoints[shape]), device="cpu", precision="fp32", text=True)
        assert embedder.text is not None and embedder.text.dim == embedder.dim
        assert embedder.text.tokenizer.identity()["id"] == tokenizer


@pytest.mark.parametrize("shape", ["vit-b-32", "vit-l-14-336"])
def test_clip_shapes_caption_rows_match_get_text_features(tmp_path, checkpoints, shape):
    """For each CLIP shape, a caption shard through the data path with text outputs: img_emb, text_emb
    and metadata aligned; text rows = CLIPModel.get_text_features on open_clip's tokens (fp32); clip_score
    = the dot of the rows. (SigLIP's: tests/worker/test_siglip_text.py.)"""
    from tests.worker.test_text import _reference_text, assert_caption_outputs

    embedder, _ = load_or_reuse(str(checkpoints[shape]), device="cpu", precision="fp32", text=True)
    spec = shards.caption_shard()
    out = tmp_path / "out"
    embed_shard(str(spec.write(tmp_path / "caps.tar")), str(out), embedder,
                EmbedOptions(dtype="float32", batch_size=3, num_threads=1, text=True))
    assert_caption_outputs(spec, out, "caps", embedder.dim,
                           lambda captions: _reference_text(checkpoints[shape], captions))


@pytest.mark.parametrize("model_type, message", [
    ("vit", "spec.model .* has model_type 'vit'; embedjob loads only CLIP and SigLIP"),
    ("siglip2", "spec.model .* SigLIP 2 NaFlex"),
])
def test_other_model_types_are_refused_naming_spec_model(tmp_path, model_type, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ModelLoadError, match=message):
        load_or_reuse(str(tmp_path), device="cpu", precision="fp32")


def test_embedjob_run_with_a_siglip_checkpoint(tmp_path, checkpoints):
    from tests.test_run import embedjob_cli, write_job

    spec = shards.simple_shard(4, seed=9)
    spec.write(tmp_path / "in" / "000.tar")
    job = write_job(tmp_path / "job.yaml", {"input": {"uri": "in/"}, "output": {"uri": "out/", "dtype": "float32"},
                                             "model": {"path": str(checkpoints["siglip-b-16"])},
                                             "inference": {"device": "cpu", "batchSize": 4}})
    r = embedjob_cli("run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "out" / "img_emb" / "000.npy").shape == (4, 64)
    manifest = json.loads((tmp_path / "out" / "_manifests" / "000.json").read_text())
    assert manifest["model"]["family"].startswith("siglip") and manifest["preprocessing"] == SIGLIP.id
