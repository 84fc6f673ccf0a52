"""Score heads (embedjob.worker.model.heads): their published architectures with random weights in the
real shapes, checked against the same MLPs written out in plain torch; then in embed_shard, where the
parquet's score columns must equal the heads run on the .npy rows."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embedjob.contract import EmbedOptions
from embedjob.spec import HeadSpec
from embedjob.storage import Storage
from embedjob.worker.datapath.shard import embed_shard
from embedjob.worker.model import ModelLoadError
from embedjob.worker.model.heads import load_head, load_heads, read_state_dict
from embedjob.worker.model.load import clear_cache, load_embedder
from embedjob.worker.model.random_weights import save_random_clip, save_random_heads
from tests import shards


@pytest.fixture(scope="module")
def head_files(tmp_path_factory):
    return save_random_heads(tmp_path_factory.mktemp("heads"))


def plain_aesthetic(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The improved aesthetic predictor v2, written out: five Linear layers, no activation."""
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x[:, 0]


def plain_nsfw(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The NSFW detector, written out: Keras normalisation, three ReLU Dense, a sigmoid Dense."""
    x = (x - state["norm.mean"]) / torch.sqrt(state["norm.variance"]).clamp(min=1e-7)
    for i in (1, 2, 3):
        x = torch.relu(x @ state[f"linear_{i}.weight"].T + state[f"linear_{i}.bias"])
    return torch.sigmoid(x @ state["linear_4.weight"].T + state["linear_4.bias"])[:, 0]


PLAIN = {"aesthetic": plain_aesthetic, "nsfw": plain_nsfw}


def unit_rows(n: int, dim: int = 768, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_heads_have_the_published_shapes_and_keys(head_files):
    aesthetic = torch.load(head_files["aesthetic"], weights_only=True)
    assert {k: tuple(v.shape) for k, v in aesthetic.items()} == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}
    nsfw = read_state_dict(head_files["nsfw"])
    assert {k: tuple(v.shape) for k, v in nsfw.items()} == {
        "norm.mean": (768,), "norm.variance": (768,), "linear_1.weight": (64, 768), "linear_1.bias": (64,),
        "linear_2.weight": (512, 64), "linear_2.bias": (512,), "linear_3.weight": (256, 512),
        "linear_3.bias": (256,), "linear_4.weight": (1, 256), "linear_4.bias": (1,)}


@pytest.mark.parametrize("score", ["aesthetic", "nsfw"])
def test_head_equals_plain_torch(head_files, score):
    head = load_head(score, HeadSpec(path=str(head_files[score])), dim=768)
    rows = unit_rows(300)
    state = read_state_dict(head_files[score])
    expected = PLAIN[score](state, torch.from_numpy(rows)).numpy()
    got = head.score(rows)
    assert got.dtype == np.float32 and got.shape == (300,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert head.identity["sha256"] == hashlib.sha256(head_files[score].read_bytes()).hexdigest()
    assert head.identity["inputDim"] == 768 and head.identity["score"] == score


def test_width_mismatch_and_foreign_weights_are_refused_naming_the_field(head_files, tmp_path):
    from embedjob.policy import describe_failure

    with pytest.raises(ModelLoadError, match=r"spec\.scores\.nsfw: the head takes 768-wide .* 512-wide") as e:
        load_head("nsfw", HeadSpec(path=str(head_files["nsfw"])), dim=512)
    assert describe_failure(e.value)["permanent"]  # the shard fails at once: retrying cannot help
    with pytest.raises(ModelLoadError, match=r"spec\.scores\.aesthetic: .* not a LAION improved aesthetic"):
        load_head("aesthetic", HeadSpec(path=str(head_files["nsfw"])), dim=768)
    with pytest.raises(ModelLoadError, match=r"spec\.scores\.aesthetic: cannot read the weights"):
        load_head("aesthetic", HeadSpec(path=str(tmp_path / "missing.pth")), dim=768)


def test_a_pickle_that_is_not_a_state_dict_is_never_run(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelLoadError, match="cannot read the weights"):
        load_head("aesthetic", HeadSpec(path=str(bad)), dim=768)


def test_hub_weights_are_fetched_by_id_revision_and_file(head_files, monkeypatch):
    """The hub is the one thing mocked: hf_hub_download returns the local file."""
    import huggingface_hub

    asked = []

    def fake_download(repo, file, revision=None, cache_dir=None):
        asked.append((repo, file, revision))
        return str(head_files["nsfw"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    head = load_head("nsfw", HeadSpec(name="laion/nsfw-l14", revision="abc123", file="nsfw.safetensors"), dim=768)
    assert asked == [("laion/nsfw-l14", "nsfw.safetensors", "abc123")]
    assert {k: head.identity[k] for k in ("id", "revision", "file")} == {
        "id": "laion/nsfw-l14", "revision": "abc123", "file": "nsfw.safetensors"}


def test_embed_shard_writes_score_columns_equal_to_the_heads_on_the_npy_rows(head_files, tmp_path):
    clear_cache()
    model_dir = save_random_clip(tmp_path / "clip768", projection_dim=768)
    embedder = load_embedder({"name": None, "revision": None, "path": str(model_dir)}, precision="fp32")
    spec = shards.varied_shard()
    tar = spec.write(tmp_path / "in" / "00000.tar")
    scores = {k: {"path": str(v)} for k, v in head_files.items()}
    heads = load_heads(scores, embedder.dim)
    out = tmp_path / "out"
    result = embed_shard(str(tar), str(out), embedder, EmbedOptions(batch_size=4, num_threads=2, dtype="float16",
                                                                    scores=scores), heads=heads)
    assert result.images > 4  # several batches
    storage = Storage()
    emb = np.load(io.BytesIO(storage.read_bytes(str(out / "img_emb/00000.npy"))))
    table = pq.read_table(io.BytesIO(storage.read_bytes(str(out / "metadata/00000.parquet"))))
    manifest = json.loads(storage.read_bytes(str(out / "_manifests/00000.json")))
    assert table.num_rows == emb.shape[0] == result.images
    rows = torch.from_numpy(emb.astype(np.float32))
    for score, plain in PLAIN.items():
        assert table.schema.field(score).type == "float"  # float32
        column = table.column(score).to_numpy()
        expected = plain(read_state_dict(head_files[score]), rows).numpy()
        np.testing.assert_allclose(column, expected, rtol=0, atol=1e-6)
        head = manifest["scores"][score]
        assert head["sha256"] == hashlib.sha256(head_files[score].read_bytes()).hexdigest()
        assert head["path"] == str(head_files[score].resolve())
        sketch = manifest["score_sketches"][score]
        assert sketch["count"] == result.images
        assert sketch["sum"] == pytest.approx(float(column.astype(np.float64).sum()), rel=1e-9)
