"""Caption text embeddings with a SigLIP checkpoint (spec.outputs: [image, text]): the checkpoint's own
SiglipTokenizer (a real SentencePiece model trained locally, saved as the hub saves it), padded to
max_position_embeddings; text rows against SiglipModel.get_text_features in fp32; hostile captions never
misalign rows; clip_score is the dot of the rows; the manifest's tokenizer identity; SigLIP 2's Gemma
tokenizer refused naming spec.model; one `embedjob run` end to end."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embedjob.contract import EmbedOptions
from embedjob.worker.datapath.shard import embed_shard
from embedjob.worker.model import ModelLoadError
from embedjob.worker.model.load import clear_cache, load_or_reuse
from embedjob.worker.model.random_weights import save_random_shape
from tests import shards
from tests.worker.test_text import assert_caption_outputs

HOSTILE = ["Tom &amp; Jerry &lt;3", "Ã©tÃ© Ã  la plage", "a 🐶 and a 🐱 🏳️‍🌈", "caf\ufffd \ufffd\ufffd au lait",
           " ".join(f"word{i}" for i in range(300)), "", "A PHOTO of THE Cat!!!", "x </s> y <unk> z",
           "tabs\tand\nnewlines   here", "東京 写真 straße naïve"]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return save_random_shape(tmp_path_factory.mktemp("siglip") / "siglip-b-16", "siglip-b-16")


@pytest.fixture(scope="module")
def siglip_model(siglip_dir):
    clear_cache()
    embedder, _ = load_or_reuse(str(siglip_dir), device="cpu", precision="fp32", text=True)
    yield embedder
    clear_cache()


def _hf_ids(folder, captions: list[str]) -> torch.Tensor:
    from transformers import SiglipTokenizer

    tok = SiglipTokenizer.from_pretrained(folder)
    return tok(captions, padding="max_length", truncation=True, max_length=64, return_tensors="pt")["input_ids"]


def _reference_text(folder, captions: list[str]) -> np.ndarray:
    """SiglipModel.get_text_features in fp32 on Hugging Face's SiglipTokenizer(padding='max_length')."""
    from transformers import SiglipModel

    model = SiglipModel.from_pretrained(folder).eval()
    with torch.inference_mode():
        out = model.get_text_features(input_ids=_hf_ids(folder, captions))
    feats = getattr(out, "pooler_output", out).numpy().astype(np.float64)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def test_tokenizer_is_hf_siglip_tokenizer_padded_to_max_length(siglip_model, siglip_dir):
    tok = siglip_model.text.tokenizer
    assert tok.context_length == 64 and tok.pad_to_context and tok.vocab_size == 1000
    expected = _hf_ids(siglip_dir, HOSTILE).tolist()
    for caption, want in zip(HOSTILE, expected, strict=True):
        got = tok.tokenize(caption)
        assert got.ids + [tok.pad_id] * (64 - len(got.ids)) == want, caption
        assert got.ids[-1] == tok.eos_id and got.truncated == caption.startswith("word0 word1")
    assert tok.tokenize("A PHOTO of THE Cat!!!").ids == tok.tokenize("a photo of the cat").ids  # canonicalised


def test_text_rows_match_get_text_features_in_any_batching(siglip_model, siglip_dir):
    ref = _reference_text(siglip_dir, HOSTILE)
    for batch in (256, 3, 1):
        siglip_model.text.batch_size = batch
        rows = siglip_model.text.embed([*HOSTILE[:5], None, *HOSTILE[5:]])
        assert rows.truncated == 1 and rows.has_caption.tolist() == [True] * 5 + [False] + [True] * 5
        assert not rows.rows[5].any()
        got = np.delete(rows.rows, 5, axis=0).astype(np.float64)
        assert (got * ref).sum(1).min() >= 0.99999, batch
    siglip_model.text.batch_size = 256


def test_shard_rows_align_clip_score_and_manifest(tmp_path, siglip_model, siglip_dir):
    spec = shards.caption_shard()
    tar = spec.write(tmp_path / "caps.tar")
    out = tmp_path / "out"
    embed_shard(str(tar), str(out), siglip_model, EmbedOptions(dtype="float32", batch_size=4, num_threads=1,
                                                               text=True))
    assert_caption_outputs(spec, out, "caps", 64, lambda captions: _reference_text(siglip_dir, captions))

    text = json.loads((out / "_manifests" / "caps.json").read_text())["text"]
    sha = hashlib.sha256((siglip_dir / "spiece.model").read_bytes()).hexdigest()
    assert text["tokenizer"]["id"] == "siglip-sentencepiece" and text["tokenizer"]["vocabSha256"] == sha
    assert text["tokenizer"]["contextLength"] == 64 and text["tokenizer"]["padding"] == "max_length"
    assert (text["captions"], text["missing"], text["truncated"]) == (5, 4, 1)  # the 300-word caption is cut


def _copy_without_tokenizer(siglip_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(siglip_dir, folder)
    return folder


def test_siglip2_gemma_tokenizer_and_missing_spiece_refused_naming_spec_model(tmp_path, siglip_dir):
    clear_cache()
    gemma = _copy_without_tokenizer(siglip_dir, tmp_path / "gemma")
    (gemma / "spiece.model").unlink()
    (gemma / "tokenizer.model").write_bytes(b"not read")
    (gemma / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    with pytest.raises(ModelLoadError, match=r"spec.model .*gemma.*tokenizer_class 'GemmaTokenizer'.*SigLIP 2"):
        load_or_reuse(str(gemma), device="cpu", precision="fp32", text=True)
    clear_cache()
    bare = _copy_without_tokenizer(siglip_dir, tmp_path / "bare")
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink()
    with pytest.raises(ModelLoadError, match=r"spec.model .*bare.*no spiece.model"):
        load_or_reuse(str(bare), device="cpu", precision="fp32", text=True)
    clear_cache()
    embedder, _ = load_or_reuse(str(bare), device="cpu", precision="fp32")  # images alone still load
    assert embedder.text is None
    clear_cache()


def test_embedjob_run_with_text_outputs_on_siglip(tmp_path, siglip_dir):
    from tests.test_run import embedjob_cli, write_job

    spec = shards.caption_shard()
    spec.write(tmp_path / "in" / "000.tar")
    job = write_job(tmp_path / "job.yaml", {"input": {"uri": "in/"}, "output": {"uri": "out/", "dtype": "float32"},
                                             "model": {"path": str(siglip_dir)}, "outputs": ["image", "text"],
                                             "inference": {"device": "cpu", "batchSize": 4}})
    r = embedjob_cli("run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    img, txt = np.load(out / "img_emb" / "000.npy"), np.load(out / "text_emb" / "000.npy")
    meta = pq.read_table(out / "metadata" / "000.parquet").to_pylist()
    assert img.shape == txt.shape == (len(spec.good_keys), 64)
    assert [m["key"] for m in meta] == spec.good_keys
    dots = np.einsum("ij,ij->i", img, txt)
    for m, dot in zip(meta, dots, strict=True):
        assert (m["clip_score"] is None) if not m["has_caption"] else m["clip_score"] == pytest.approx(float(dot),
                                                                                                         abs=1e-6)
    manifest = json.loads((out / "_manifests" / "000.json").read_text())
    assert manifest["model"]["family"].startswith("siglip")
    assert manifest["text"]["tokenizer"]["id"] == "siglip-sentencepiece" and manifest["text"]["truncated"] == 1
