"""Caption text embeddings in the same shard pass (spec.outputs: [image, text]): text_emb rows against
the checkpoint's own get_text_features in fp32, row alignment with img_emb and metadata, has_caption,
clip_score, the manifest's text block, and the spec fields."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embedjob.contract import EmbedOptions
from embedjob.spec import SpecError, parse_spec
from embedjob.worker.datapath.shard import embed_shard
from embedjob.worker.model import ModelLoadError
from embedjob.worker.model.load import clear_cache, load_or_reuse
from tests import shards
from tests.worker.test_tokenizer import open_clip_reference


@pytest.fixture(scope="module")
def text_model(text_clip_dir):
    clear_cache()
    embedder, _ = load_or_reuse(str(text_clip_dir), device="cpu", precision="fp32", text=True)
    yield embedder
    clear_cache()


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory, text_model):
    tmp = tmp_path_factory.mktemp("captions")
    spec = shards.caption_shard()
    tar = spec.write(tmp / "caps.tar")
    out = tmp / "out"
    options = EmbedOptions(dtype="float32", batch_size=4, num_threads=1, text=True)
    embed_shard(str(tar), str(out), text_model, options)
    return spec, out


def _reference_text(model_dir, captions: list[str]) -> np.ndarray:
    """Hugging Face's full CLIPModel.get_text_features on open_clip's tokens (77 wide, zero padded)."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    ids = open_clip_reference()(captions)
    with torch.inference_mode():
        out = model.get_text_features(input_ids=ids)
    feats = getattr(out, "pooler_output", out).numpy().astype(np.float64)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def assert_caption_outputs(spec: shards.ShardSpec, out, stem: str, dim: int, reference) -> None:
    """A caption shard's outputs: img_emb, text_emb and metadata rows aligned (a broken image has no row
    in any file); text rows = ``reference(captions)`` (the checkpoint's own get_text_features, fp32,
    cosine >= 0.99999), unit norm; a zero row where there is no caption (missing, empty, whitespace);
    clip_score = the dot of the two rows as written, null without a caption."""
    img, txt = np.load(out / "img_emb" / f"{stem}.npy"), np.load(out / "text_emb" / f"{stem}.npy")
    meta = pq.read_table(out / "metadata" / f"{stem}.parquet").to_pylist()
    assert img.shape == txt.shape == (len(spec.good_keys), dim) and txt.dtype == np.float32
    assert [r["key"] for r in meta] == spec.good_keys
    expected_caption = {k: c for k, c in spec.captions.items() if c.strip()}
    has = [r["has_caption"] for r in meta]
    assert has == [k in expected_caption for k in spec.good_keys]
    with_caption = [i for i, h in enumerate(has) if h]
    ref = reference([expected_caption[spec.good_keys[i]] for i in with_caption])
    cos = (txt[with_caption].astype(np.float64) * ref).sum(1)
    assert cos.min() >= 0.99999, cos
    np.testing.assert_allclose(np.linalg.norm(txt[with_caption], axis=1), 1.0, atol=1e-5)
    assert not txt[[i for i, h in enumerate(has) if not h]].any()
    dots = np.einsum("ij,ij->i", img, txt)
    for row, dot in zip(meta, dots, strict=True):
        if row["has_caption"]:
            assert row["clip_score"] == pytest.approx(float(dot), abs=1e-6)
        else:
            assert row["clip_score"] is None


def test_rows_align_match_get_text_features_and_clip_score_is_their_dot(caption_run, text_clip_dir):
    spec, out = caption_run
    assert_caption_outputs(spec, out, "caps", 32, lambda captions: _reference_text(text_clip_dir, captions))


def test_manifest_records_tokenizer_and_caption_counts(caption_run):
    spec, out = caption_run
    manifest = json.loads((out / "_manifests" / "caps.json").read_text())
    text = manifest["text"]
    assert text["source"] == "txt"
    assert text["tokenizer"]["id"] == "openai-clip-bpe-49408" and text["tokenizer"]["contextLength"] == 77
    assert (text["captions"], text["missing"], text["truncated"]) == (5, 4, 1)  # the 300-word caption is cut
    assert manifest["files"]["text_embeddings"]["shape"] == [len(spec.good_keys), 32]
    assert [f["key"] for f in manifest["failed"]] == spec.failed_keys


def test_caption_from_a_json_field_in_float16(tmp_path, text_model, text_clip_dir):
    spec = shards.caption_shard()
    tar = spec.write(tmp_path / "caps.tar")
    options = EmbedOptions(dtype="float16", batch_size=3, num_threads=1, text=True, text_json_field="caption")
    embed_shard(str(tar), str(tmp_path / "out"), text_model, options)
    img = np.load(tmp_path / "out" / "img_emb" / "caps.npy")
    txt = np.load(tmp_path / "out" / "text_emb" / "caps.npy")
    meta = pq.read_table(tmp_path / "out" / "metadata" / "caps.parquet").to_pylist()
    assert txt.dtype == np.float16 and txt.shape == img.shape
    by_key = {r["key"]: (i, r) for i, r in enumerate(meta)}
    json_keys = [k for k in spec.good_keys if by_key[k][1]["has_caption"]]
    assert json_keys == ["0006_mojibake", "0008_json_only"]  # a number in the field is no caption
    ref = _reference_text(text_clip_dir, ["json caption of mojibake", 'Only in the &quot;JSON&quot;'])
    rows = txt[[by_key[k][0] for k in json_keys]].astype(np.float64)
    assert ((rows * ref).sum(1) / np.linalg.norm(rows, axis=1)).min() >= 0.999  # float16 rows
    dots = np.einsum("ij,ij->i", img.astype(np.float32), txt.astype(np.float32))
    for k in json_keys:
        i, r = by_key[k]
        assert r["clip_score"] == pytest.approx(float(dots[i]), abs=1e-6)
    manifest = json.loads((tmp_path / "out" / "_manifests" / "caps.json").read_text())
    assert manifest["text"]["source"] == "json:caption" and manifest["text"]["captions"] == 2


def test_image_only_outputs_are_unchanged(tmp_path, text_model):
    spec = shards.caption_shard()
    tar = spec.write(tmp_path / "caps.tar")
    embed_shard(str(tar), str(tmp_path / "out"), text_model, EmbedOptions(dtype="float32", batch_size=4,
                                                                          num_threads=1))
    assert not (tmp_path / "out" / "text_emb").exists()
    names = pq.read_table(tmp_path / "out" / "metadata" / "caps.parquet").column_names
    assert names == ["key", "shard", "member", "width", "height", "caption", "json"]
    assert "text" not in json.loads((tmp_path / "out" / "_manifests" / "caps.json").read_text())


def test_text_refused_for_a_tower_without_clip_token_ids(tiny_clip_dir):
    clear_cache()
    try:
        with pytest.raises(ModelLoadError, match="spec.outputs: text.*vocabulary 1000"):
            load_or_reuse(str(tiny_clip_dir), device="cpu", precision="fp32", text=True)
    finally:
        clear_cache()


def test_spec_outputs_and_text_fields():
    base = {"input": {"uri": "s3://in-bucket/x/"}, "output": {"uri": "s3://out-bucket/y/"}}
    assert parse_spec(base).outputs == ("image",)
    job = parse_spec({**base, "outputs": ["text", "image"], "text": {"jsonField": "caption"}})
    assert job.outputs == ("image", "text") and job.text.jsonField == "caption"
    assert job.to_dict()["outputs"] == ["image", "text"]
    options = EmbedOptions.from_spec(job)
    assert options.text and options.text_json_field == "caption"
    for bad, field in [({"outputs": ["text"]}, "spec.outputs"), ({"outputs": ["image", "audio"]}, "spec.outputs"),
                       ({"outputs": "image"}, "spec.outputs"), ({"outputs": ["image", "image"]}, "spec.outputs"),
                       ({"text": {"jsonField": "c"}}, "spec.text"),
                       ({"outputs": ["image", "text"], "text": {"field": "c"}}, "spec.text.field")]:
        with pytest.raises(SpecError) as e:
            parse_spec({**base, **bad})
        assert e.value.field == field


def test_embedding_reader_reads_text_emb_as_it_reads_img_emb(caption_run):
    """embedding-reader (what autofaiss and clip-retrieval read with) takes text_emb/ + metadata/ as it
    takes img_emb/ + metadata/: the same rows, in the same order, with the new columns."""
    from embedding_reader import EmbeddingReader

    spec, out = caption_run
    for folder in ("img_emb", "text_emb"):
        reader = EmbeddingReader(str(out / folder), file_format="parquet_npy", meta_columns=["key", "has_caption"],
                                 metadata_folder=str(out / "metadata"))
        assert reader.count == len(spec.good_keys) and reader.dimension == 32
        rows, meta = next(reader(batch_size=100, show_progress=False))
        assert np.array_equal(rows, np.load(out / folder / "caps.npy"))
        assert list(meta["key"]) == spec.good_keys and meta["has_caption"].sum() == 5


def test_a_json_sidecar_nested_past_the_parsers_depth_is_no_caption(tmp_path, text_model):
    """A 200 kB `.json` of "[" (or of `{"caption": ` repeated) made json.loads raise RecursionError, which
    failed the whole shard; it is a sample without a caption, like any JSON that does not parse."""
    spec = shards.ShardSpec()
    for i, sidecar in enumerate(["[" * 200_000, '{"caption": ' * 80_000, '{"caption": "a red bus"}']):
        spec.members.append((f"{i:04d}.jpg", shards.encode(shards.rgb(64, 48, i), "JPEG")))
        spec.members.append((f"{i:04d}.json", sidecar.encode()))
    tar = spec.write(tmp_path / "deep.tar")
    options = EmbedOptions(dtype="float32", batch_size=4, num_threads=1, text=True, text_json_field="caption")
    embed_shard(str(tar), str(tmp_path / "out"), text_model, options)
    meta = pq.read_table(tmp_path / "out" / "metadata" / "deep.parquet").to_pylist()
    assert [(r["key"], r["has_caption"]) for r in meta] == [("0000", False), ("0001", False), ("0002", True)]
    txt = np.load(tmp_path / "out" / "text_emb" / "deep.npy")
    assert not txt[:2].any() and np.linalg.norm(txt[2]) == pytest.approx(1.0, abs=1e-5)
