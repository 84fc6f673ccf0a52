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
