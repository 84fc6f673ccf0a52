"""Job spec validation: every bad field is named; defaults are filled."""

from __future__ import annotations

import pytest

from embedjob.spec import DEFAULT_MODEL, DEFAULT_REVISION, SpecError, load_job_file, parse_job, parse_spec


def job(**spec):
    base = {"input": {"uri": "s3://datasets/laion/{00000..00009}.tar"}, "output": {"uri": "s3://embeddings/laion/"}}
    base.update(spec)
    return {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob", "metadata": {"name": "j"}, "spec": base}


def test_defaults_filled():
    j = parse_job(job())
    s = j.spec
    assert (j.name, j.namespace) == ("j", "default")
    assert s.model.name == DEFAULT_MODEL and s.model.revision == DEFAULT_REVISION
    assert s.output.dtype == "float16" and s.inference.batchSize == 0 and s.inference.precision == "auto"
    assert s.retries.perShard == 3 and s.maxFailedShards == 0 and s.queue == "embedjob" and not s.suspend
    assert s.inference.preprocessing == "exact" and s.inference.numThreads == 0  # 0: every usable CPU
    assert s.inference.compile == "none"  # 0 batch size above: tuned on the device


def test_fast_preprocessing_is_opt_in_and_reaches_the_task_options():
    from embedjob.contract import EmbedOptions

    s = parse_job(job(inference={"preprocessing": "fast", "numThreads": 6})).spec
    options = EmbedOptions.from_spec(s)
    assert (options.preprocessing, options.num_threads) == ("fast", 6)
    assert EmbedOptions.from_spec(parse_job(job()).spec).preprocessing == "exact"


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"output": {"uri": "s3://embeddings/x/", "dtype": "int8"}}, "spec.output.dtype"),
        ({"inference": {"batchSize": -1}}, "spec.inference.batchSize"),
        ({"inference": {"batchSize": 5000}}, "spec.inference.batchSize"),
        ({"inference": {"compile": "yes"}}, "spec.inference.compile"),
        ({"inference": {"batchSize": "32"}}, "spec.inference.batchSize"),
        ({"inference": {"precision": "fp8"}}, "spec.inference.precision"),
        ({"inference": {"preprocessing": "fastest"}}, "spec.inference.preprocessing"),
        ({"inference": {"numThreads": -1}}, "spec.inference.numThreads"),
        ({"retries": {"perShard": -1}}, "spec.retries.perShard"),
        ({"maxFailedShards": -2}, "spec.maxFailedShards"),
        ({"suspend": "yes"}, "spec.suspend"),
        ({"input": {"uri": "gs://bucket/x/"}}, "spec.input.uri"),
        ({"input": {"uri": "s3://B_ad/x/"}}, "spec.input.uri"),
        ({"input": {"shards": []}}, "spec.input.shards"),
        ({"input": {"shards": ["s3://datasets/a.zip"]}}, "spec.input.shards[0]"),
        ({"input": {}}, "spec.input"),
        ({"input": {"uri": "s3://datasets/x/", "shards": ["s3://datasets/a.tar"]}}, "spec.input"),
        ({"output": {}}, "spec.output.uri"),
        ({"output": {"uri": "s3://datasets/laion/out/"}}, "spec.output.uri"),  # inside the input
        ({"storage": {"endpoint": "seaweed:8333"}}, "spec.storage.endpoint"),
        ({"queue": "bad queue"}, "spec.queue"),
        ({"bogus": 1}, "spec.bogus"),
        ({"model": {"nme": "x"}}, "spec.model.nme"),
        ({"priority": 11}, "spec.priority"),
        ({"priority": "high"}, "spec.priority"),
    ],
)
def test_bad_field_is_named(spec, field):
    with pytest.raises(SpecError) as e:
        parse_job(job(**spec))
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_priority_defaults_to_0_and_takes_negative_values():
    assert parse_job(job()).spec.priority == 0
    assert parse_job(job(priority=-3)).spec.priority == -3


def test_operator_refuses_local_paths():
    with pytest.raises(SpecError) as e:
        parse_spec({"input": {"uri": "/data/shards/"}, "output": {"uri": "s3://embeddings/x/"}}, allow_local=False)
    assert e.value.field == "spec.input.uri"


def test_header_fields_named():
    bad = job()
    bad["kind"] = "Job"
    with pytest.raises(SpecError, match="^kind:"):
        parse_job(bad)
    bad = job()
    bad["metadata"]["name"] = "Bad_Name"
    with pytest.raises(SpecError, match="^metadata.name:"):
        parse_job(bad)


def test_job_file_resolves_local_paths(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "apiVersion: embedjob.io/v1alpha1\nkind: EmbeddingJob\nmetadata: {name: local}\n"
        "spec:\n  input: {uri: shards/}\n  output: {uri: out/}\n"
    )
    j = load_job_file(tmp_path / "job.yaml")
    assert j.spec.input.uri == str(tmp_path / "shards")
    assert j.spec.output.uri == str(tmp_path / "out")


def test_job_file_errors(tmp_path):
    with pytest.raises(SpecError, match="^file:"):
        load_job_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="^file:.*not valid YAML"):
        load_job_file(tmp_path / "bad.yaml")


def test_a_model_path_implies_no_hub_id():
    from embedjob.spec import DEFAULT_MODEL, DEFAULT_REVISION, parse_spec

    base = {"input": {"uri": "s3://in-bucket/x/"}, "output": {"uri": "s3://out-bucket/y/"}}
    local = parse_spec({**base, "model": {"path": "/models/mine"}})
    assert (local.model.name, local.model.revision, local.model.path) == (None, None, "/models/mine")
    hub = parse_spec(base)
    assert (hub.model.name, hub.model.revision) == (DEFAULT_MODEL, DEFAULT_REVISION)


def test_on_truncated_shard():
    import pytest

    from embedjob.spec import SpecError, parse_spec

    base = {"input": {"uri": "s3://in-bucket/x/"}, "output": {"uri": "s3://out-bucket/y/"}}
    assert parse_spec(base).onTruncatedShard == "record"
    assert parse_spec({**base, "onTruncatedShard": "fail"}).onTruncatedShard == "fail"
    with pytest.raises(SpecError, match="spec.onTruncatedShard: must be one of record, fail"):
        parse_spec({**base, "onTruncatedShard": "ignore"})


# -- spec.scores ----------------------------------------------------------------------------------------
def test_scores_parse_and_reach_the_task_options(tmp_path):
    from embedjob.contract import EmbedOptions

    weights = tmp_path / "aesthetic.pth"
    weights.write_bytes(b"")
    s = parse_job(job(scores={"aesthetic": {"path": str(weights)},
                              "nsfw": {"name": "laion/nsfw", "revision": "r1", "file": "nsfw.safetensors"}})).spec
    assert s.scores.aesthetic.path == str(weights) and s.scores.nsfw.name == "laion/nsfw"
    assert EmbedOptions.from_spec(s).scores == {
        "aesthetic": {"name": None, "revision": None, "path": str(weights), "file": None},
        "nsfw": {"name": "laion/nsfw", "revision": "r1", "path": None, "file": "nsfw.safetensors"}}
    assert parse_job(job()).spec.scores.heads() == {}
    assert EmbedOptions.from_spec(parse_job(job()).spec).scores is None


@pytest.mark.parametrize(
    "scores, field",
    [
        ({"clip": {"name": "x"}}, "spec.scores.clip"),
        ({"aesthetic": {}}, "spec.scores.aesthetic"),
        ({"aesthetic": {"name": "a/b", "path": "/w.pth"}}, "spec.scores.aesthetic"),
        ({"nsfw": {"name": "a/b", "file": "model.ckpt"}}, "spec.scores.nsfw.file"),
        ({"nsfw": {"path": "/weights.pkl"}}, "spec.scores.nsfw.path"),
        ({"nsfw": {"path": "/w.pth", "revision": "r"}}, "spec.scores.nsfw"),
        ({"aesthetic": "yes"}, "spec.scores.aesthetic"),
    ],
)
def test_bad_scores_field_is_named(scores, field):
    with pytest.raises(SpecError) as e:
        parse_job(job(scores=scores))
    assert e.value.field == field


def test_a_head_whose_width_is_not_the_models_is_refused_naming_the_field(tmp_path):
    """A 32-wide model (its config.json says so) with the 768-wide heads: refused at validation."""
    from embedjob.worker.model.random_weights import save_random_clip, save_random_heads

    model = save_random_clip(tmp_path / "clip32", projection_dim=32)
    heads = save_random_heads(tmp_path / "heads")
    for score in ("nsfw", "aesthetic"):  # a safetensors header read, and a .pth of the published width
        with pytest.raises(SpecError) as e:
            parse_job(job(model={"path": str(model)}, scores={score: {"path": str(heads[score])}}))
        assert e.value.field == f"spec.scores.{score}"
        assert "768-wide" in e.value.message and "32-wide" in e.value.message
    # The default model (ViT-L/14, 768) takes them.
    assert parse_job(job(scores={"nsfw": {"path": str(heads["nsfw"])}})).spec.scores.nsfw
    # Heads made for the 32-wide model: both files' widths are read (the .pth's pickle walked, never run).
    narrow = save_random_heads(tmp_path / "heads32", width=32)
    both = {score: {"path": str(narrow[score])} for score in ("aesthetic", "nsfw")}
    assert set(parse_job(job(model={"path": str(model)}, scores=both)).spec.scores.heads()) == {"aesthetic", "nsfw"}
    with pytest.raises(SpecError) as e:
        parse_job(job(scores={"aesthetic": {"path": str(narrow["aesthetic"])}}))
    assert e.value.field == "spec.scores.aesthetic" and "32-wide" in e.value.message


def test_output_report_is_off_by_default():
    assert parse_job(job()).spec.output.report is False
    assert parse_job(job(output={"uri": "s3://embeddings/x/", "report": True})).spec.output.report is True
    with pytest.raises(SpecError) as e:
        parse_job(job(output={"uri": "s3://embeddings/x/", "report": "yes"}))
    assert e.value.field == "spec.output.report"
