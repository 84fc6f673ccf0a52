"""The admin's ceilings and model allow-list (embedjob.limits): at admission (the operator's accept,
against REAL Redis and SeaweedFS) and in the worker's check of a message."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from embedjob.contract import EmbedOptions
from embedjob.limits import OptionsNotAllowed, check_spec, check_task
from embedjob.operator.accept import accept
from embedjob.policy import describe_failure
from embedjob.settings import Settings
from embedjob.spec import DEFAULT_MODEL, DEFAULT_REVISION, SpecError, parse_spec
from tests.operator.jobs import is_true

SETTINGS = Settings.from_env({"EMBEDJOB_MAX_IMAGE_PIXELS": "100000000", "EMBEDJOB_MAX_NUM_THREADS": "8",
                              "EMBEDJOB_MAX_RETRIES": "5", "EMBEDJOB_MAX_PRIORITY": "2",
                              "EMBEDJOB_MODEL_ALLOW_LIST": json.dumps([f"{DEFAULT_MODEL}@{DEFAULT_REVISION}",
                                                                       "org/any-revision"])})
BASE = {"input": {"uri": "s3://bkt/in/"}, "output": {"uri": "s3://bkt/out/"}}


@pytest.mark.parametrize(("extra", "field"), [
    ({"inference": {"maxImagePixels": 400_000_000}}, "spec.inference.maxImagePixels"),
    ({"inference": {"numThreads": 256}}, "spec.inference.numThreads"),
    ({"retries": {"perShard": 100}}, "spec.retries.perShard"),
    ({"priority": 10}, "spec.priority"),
    ({"model": {"name": "evil/model"}}, "spec.model.name"),
    ({"model": {"name": DEFAULT_MODEL, "revision": "main"}}, "spec.model.revision"),
    ({"scores": {"nsfw": {"name": "evil/heads", "revision": "v1"}}}, "spec.scores.nsfw.name"),
])
def test_admission_refuses_what_is_beyond_the_ceilings_naming_the_field(extra, field):
    with pytest.raises(SpecError) as e:
        check_spec(parse_spec({**BASE, **extra}), SETTINGS)
    assert e.value.field == field and "on this cluster" in str(e.value) or "allow-list" in str(e.value)


def test_within_the_ceilings_passes_and_a_model_folder_is_not_a_hub_model():
    for extra in ({}, {"inference": {"maxImagePixels": 50_000_000, "numThreads": 8}, "priority": 2},
                  {"model": {"name": "org/any-revision", "revision": "abc"}},
                  {"model": {"path": "/models/mine"}},
                  {"scores": {"nsfw": {"name": "org/any-revision", "revision": "abc"}}}):
        check_spec(parse_spec({**BASE, **extra}), SETTINGS)
    check_spec(parse_spec({**BASE, "model": {"name": "anything/at-all"}}), Settings())  # no list: any


def test_the_operator_fails_such_a_job_with_a_condition_naming_the_field(store):
    acc = accept(store, {**BASE, "inference": {"numThreads": 256}}, {}, 1, settings=SETTINGS)
    assert not acc.ok and acc.status["phase"] == "Failed" and is_true(acc.status["conditions"], "Failed")
    cond = next(c for c in acc.status["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "InvalidSpec" and cond["message"].startswith("spec.inference.numThreads: "), cond
    assert store.plan() is None


def test_the_worker_revalidates_every_message_against_its_own_ceilings():
    good = asdict(EmbedOptions())
    model = {"name": DEFAULT_MODEL, "revision": DEFAULT_REVISION, "path": None}
    assert check_task(good, model, SETTINGS, cpus=4) == EmbedOptions()
    for options, field in (({**good, "max_image_pixels": 10**12}, "options.max_image_pixels"),
                           ({**good, "num_threads": 256}, "options.num_threads"),
                           ({**good, "num_threads": 6}, "options.num_threads"),  # 6 > its 4 CPUs
                           ({**good, "batch_size": -1}, "options.batch_size"),
                           ({**good, "num_threads": "8"}, "options.num_threads"),
                           ({**good, "device": "tpu"}, "options.device"),
                           ({**good, "text": "yes"}, "options.text"),
                           ({**good, "text_json_field": "x" * 1000}, "options.text_json_field"),
                           ({**good, "scores": ["aesthetic"]}, "options.scores"),
                           ({**good, "scores": {"nsfw": {"name": "evil/heads", "revision": "v1", "path": None,
                                                         "file": "model.safetensors"}}}, "options.scores.nsfw"),
                           ({**good, "evil": 1}, "options.evil")):
        with pytest.raises(OptionsNotAllowed) as e:
            check_task(options, model, SETTINGS, cpus=4)
        assert e.value.field == f"task {field}"
        assert describe_failure(e.value) | {"error": ""} == {"error": "", "errorCode": "OptionsNotAllowed",
                                                             "transient": False, "permanent": True,
                                                             "accessError": True}
    with pytest.raises(OptionsNotAllowed, match="model allow-list"):
        check_task(good, {"name": "evil/model", "revision": "main"}, SETTINGS, cpus=4)


@pytest.fixture()
def store(redis_url):
    import uuid

    from embedjob.progress import ProgressStore, redis_client

    r = redis_client(redis_url)
    yield ProgressStore(r, str(uuid.uuid4()))
    r.close()
