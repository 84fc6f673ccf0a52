"""Loading the model (embedjob.worker.model.load): the vision tower from a full CLIP checkpoint
folder, matching Hugging Face's own CLIP image features, SDPA attention, never running checkpoint
code, and the per-process cache."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from embedjob.contract import EmbedOptions
from embedjob.worker.datapath.shard import embed_shard
from embedjob.worker.model import ModelLoadError
from embedjob.worker.model.load import clear_cache, load_embedder
from tests import shards
from tests.worker.datapath.test_preprocess import clip_reference


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def _reference_embeddings(model_dir, images: list[Image.Image]) -> np.ndarray:
    """Hugging Face's full CLIPModel.get_image_features on independently preprocessed pixels."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    pixels = torch.from_numpy(np.stack([clip_reference(i) for i in images]))
    with torch.inference_mode():
        out = model.get_image_features(pixel_values=pixels)
    feats = getattr(out, "pooler_output", out).numpy().astype(np.float64)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _embed_varied_shard(tmp_path, embedder, dtype):
    spec = shards.varied_shard()
    tar = spec.write(tmp_path / "varied.tar")
    out = tmp_path / f"out-{dtype}"
    result = embed_shard(str(tar), str(out), embedder, EmbedOptions(dtype=dtype, batch_size=5, num_threads=2))
    emb = np.load(out / "img_emb" / "varied.npy")
    keys = pq.read_table(out / "metadata" / "varied.parquet").column("key").to_pylist()
    # Rows of images the reference itself mishandles (16-bit, float) are checked in test_preprocess.
    data = spec.members_by_key()
    rows = [i for i, k in enumerate(keys) if k.split("_", 1)[1] not in shards.NON_REFERENCE]
    images = [Image.open(io.BytesIO(data[keys[i]])) for i in rows]
    return result, emb[rows], [keys[i] for i in rows], images


def test_loads_from_a_full_clip_checkpoint_folder(tiny_clip_dir):
    e = load_embedder({"name": "tiny-clip", "revision": None, "path": str(tiny_clip_dir)})
    assert (e.model_id, e.dim, e.device.type, e.dtype) == ("tiny-clip", 32, "cpu", torch.float32)
    assert e.source == str(tiny_clip_dir)
    assert not hasattr(e.module, "text_model")  # only the vision tower was built
    # a folder is recorded as what it is (no hub id: "tiny-clip" was not loaded from the hub)
    described = e.describe()
    assert described == {"path": str(tiny_clip_dir.resolve()), "source": str(tiny_clip_dir.resolve()), "name": None,
                         "family": "clip ViT width 64, 2 layers, patch 14", "dim": 32,
                         "weightsSha256": described["weightsSha256"], "imageSize": 224,
                         "preprocessing": "openai-clip-reference-v1", "device": "cpu", "precision": "fp32",
                         "attention": "sdpa", "compile": "none", "compileWarmupSeconds": 0.0}
    assert len(described["weightsSha256"]) == 64
    # Loaded once per process: the same object comes back.
    assert load_embedder({"name": "tiny-clip", "path": str(tiny_clip_dir)}) is e
    # A bare path works too.
    assert load_embedder(str(tiny_clip_dir)).dim == 32


def test_fp32_rows_match_hugging_face_clip_features(tiny_clip_dir, tmp_path):
    embedder = load_embedder({"name": "tiny-clip", "path": str(tiny_clip_dir)}, device="cpu", precision="fp32")
    result, emb, keys, images = _embed_varied_shard(tmp_path, embedder, "float32")
    assert result.images == 22 and len(keys) == emb.shape[0] == 20
    assert emb.dtype == np.float32
    cos = _cosines(emb, _reference_embeddings(tiny_clip_dir, images))
    assert cos.min() >= 0.99999, dict(zip(keys, cos, strict=True))


def test_float16_output_and_fp16_compute_stay_close(tiny_clip_dir, tmp_path):
    fp32 = load_embedder({"name": "tiny-clip", "path": str(tiny_clip_dir)}, precision="fp32")
    _, emb16, _, images = _embed_varied_shard(tmp_path, fp32, "float16")
    ref = _reference_embeddings(tiny_clip_dir, images)
    assert emb16.dtype == np.float16
    assert _cosines(emb16, ref).min() >= 0.999
    # Reduced-precision compute (allowed on CPU when the build supports it) stays close too.
    half = load_embedder({"name": "tiny-clip", "path": str(tiny_clip_dir)}, precision="fp16")
    assert half.dtype == torch.float16
    pixels = torch.from_numpy(np.stack([clip_reference(i) for i in images]))
    out = half.embed(pixels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)  # normalised in fp32
    assert _cosines(out, ref).min() >= 0.999


def test_auto_precision_is_fp32_on_cpu_and_cuda_is_refused_without_a_gpu(tiny_clip_dir):
    assert load_embedder(str(tiny_clip_dir), device="auto", precision="auto").dtype == (
        torch.float16 if torch.cuda.is_available() else torch.float32
    )
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_embedder(str(tiny_clip_dir), device="cuda")
    with pytest.raises(ModelLoadError, match="precision"):
        load_embedder(str(tiny_clip_dir), precision="int8")


def test_never_runs_code_shipped_with_a_checkpoint(tmp_path, tiny_clip_dir):
    marker = tmp_path / "remote-code-ran"
    code = f"open({str(marker)!r}, 'w').write('pwned')\n"

    # A non-CLIP checkpoint that needs its own code: refused before anything is imported.
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "modeling_evil.py").write_text(code)
    (evil / "configuration_evil.py").write_text(code)
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evil",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    }))
    with pytest.raises(ModelLoadError, match="trust_remote_code is never enabled"):
        load_embedder(str(evil))

    # A CLIP checkpoint that also ships custom code: loads with the built-in classes, code unused.
    clip_with_code = tmp_path / "clip-with-code"
    shutil.copytree(tiny_clip_dir, clip_with_code)
    (clip_with_code / "modeling_evil.py").write_text(code)
    config = json.loads((clip_with_code / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (clip_with_code / "config.json").write_text(json.dumps(config))
    assert load_embedder(str(clip_with_code)).dim == 32
    assert not marker.exists()


def test_incomplete_vision_weights_are_an_error_not_random_layers(tmp_path, tiny_clip_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["projection_dim"] = 16  # the saved projection is 32 wide
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot load|complete"):
        load_embedder(str(broken))


# -- attention, compile modes, cache ---------------------------------------------------------
def test_sdpa_attention_is_used_recorded_and_matches_eager_attention(tiny_clip_dir):
    from transformers import CLIPVisionModelWithProjection

    embedder = load_embedder({"name": "x", "path": str(tiny_clip_dir)}, device="cpu", precision="fp32")
    assert embedder.describe()["attention"] == "sdpa"
    crops = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8))
    eager = CLIPVisionModelWithProjection.from_pretrained(
        str(tiny_clip_dir), config=embedder.module.config.__class__.from_dict(
            {**embedder.module.config.to_dict(), "_attn_implementation": "eager"}),
        attn_implementation="eager").eval()
    from embedjob.worker.model.embedder import normalize_on_device

    with torch.inference_mode():
        ref = eager(pixel_values=normalize_on_device(crops)).image_embeds.numpy()
    assert _cosines(embedder.embed_uint8(crops), ref).min() >= 0.99999


def test_compile_modes_are_checked_and_cuda_graphs_need_cuda(tiny_clip_dir):
    ref = {"name": "x", "path": str(tiny_clip_dir)}
    with pytest.raises(ModelLoadError, match="compile mode 'fast'"):
        load_embedder(ref, device="cpu", compile="fast")
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        load_embedder(ref, device="cpu", compile="reduce-overhead")


def test_load_or_reuse_says_whether_it_loaded(tiny_clip_dir):
    from embedjob.worker.model.load import load_or_reuse

    ref = {"name": "x", "path": str(tiny_clip_dir)}
    first, cached = load_or_reuse(ref, device="cpu", precision="fp32")
    assert not cached
    again, cached = load_or_reuse(ref, device="cpu", precision="fp32")
    assert cached and again is first and load_embedder(ref, device="cpu", precision="fp32") is first


def test_the_cache_holds_one_model_and_loading_another_frees_the_first(tiny_clip_dir, tmp_path):
    """A worker serving many jobs holds one model: the second load drops the first, which is then
    garbage-collected (on CUDA its memory goes back too: torch.cuda.empty_cache after the drop)."""
    import gc
    import os
    import weakref

    from embedjob.worker.model.load import load_or_reuse
    from embedjob.worker.model.random_weights import save_random_clip

    other = save_random_clip(tmp_path / "other")
    first, _ = load_or_reuse({"name": "a", "path": str(tiny_clip_dir)}, device="cpu", precision="fp32")
    gone = weakref.ref(first.module)
    del first
    second, cached = load_or_reuse({"name": "b", "path": str(other)}, device="cpu", precision="fp32")
    gc.collect()
    assert not cached and gone() is None  # the first model is freed, not kept "in case"
    # a different dtype of the same model is another entry too; the model in use stays alive while used
    in_use = weakref.ref(second.module)
    third, _ = load_or_reuse({"name": "b", "path": str(other)}, device="cpu", precision="bf16")
    assert in_use() is second.module  # still referenced by its user (a shard in flight)
    del second
    gc.collect()
    assert in_use() is None and third.module is not None
    # no hub kernels, whatever the environment says
    assert os.environ.get("USE_HUB_KERNELS") == "0"
