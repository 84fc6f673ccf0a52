"""The storage allow-list (embedjob.access): who may use the workers' storage credentials.

- the policy itself and its setting (EMBEDJOB_STORAGE_ALLOW_LIST);
- the operator's accept against REAL Redis and SeaweedFS: a job outside its namespace's prefixes is
  Failed with a condition naming the field, and nothing is planned or read; one inside is planned;
- a REAL ``embedjob worker`` subprocess (on a password-protected redis-server, as in the chart) that
  receives forged task messages (another bucket, an output elsewhere, a local input, a local model)
  records each as a hard failure and embeds nothing, while an allowed message is embedded.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from embedjob.access import AccessPolicy, StorageNotAllowed
from embedjob.contract import EmbedOptions, ShardTask
from embedjob.dev.services import RedisServer
from embedjob.operator import status as st
from embedjob.operator.accept import accept
from embedjob.policy import describe_failure
from embedjob.progress import ProgressStore, redis_client
from embedjob.settings import Settings
from embedjob.storage import Storage, s3_client
from tests.shards import simple_shard
from tests.worker.celery_workers import Workers
from tests.worker.celery_workers import put_shard as _put_shard
from tests.worker.celery_workers import send_task as _send
from tests.worker.celery_workers import wait_state as _wait_state

ALLOW = {"*": ["s3://shared-datasets/"], "team-a": ["s3://team-a/", "s3://team-a-out/embeddings"]}


def policy(**kw) -> AccessPolicy:  # noqa: ANN003
    return AccessPolicy.from_settings(Settings.from_env({"EMBEDJOB_STORAGE_ALLOW_LIST": json.dumps(ALLOW), **kw}))


# -- the policy ----------------------------------------------------------------------------------------------
def test_namespace_entries_plus_the_global_ones_decide():
    p = policy()
    p.check("spec.input.uri", "s3://shared-datasets/laion/{00000..00009}.tar", "team-b")
    p.check("spec.input.uri", "s3://team-a/in/", "team-a")
    p.check("spec.output.uri", "s3://team-a-out/embeddings/run1/", "team-a")
    p.check("spec.output.uri", "s3://team-a-out/embeddings", "team-a")  # the prefix itself
    with pytest.raises(StorageNotAllowed) as e:
        p.check("spec.input.uri", "s3://team-a/in/", "team-b")
    assert e.value.field == "spec.input.uri"
    assert "outside the storage allow-list for namespace 'team-b'" in str(e.value)
    assert "s3://shared-datasets/" in str(e.value)
    # A prefix is a folder: s3://team-a/ does not admit the bucket team-ab, nor embeddings2/ embeddings/.
    for uri in ("s3://team-ab/x/", "s3://team-a-out/embeddings2/"):
        with pytest.raises(StorageNotAllowed):
            p.check("spec.output.uri", uri, "team-a")


def test_local_paths_and_the_model_cache():
    p = policy(EMBEDJOB_ALLOW_LOCAL_PATHS="false", EMBEDJOB_MODEL_DIR="/models")
    with pytest.raises(StorageNotAllowed, match="local paths are not allowed"):
        p.check("task input", "/etc/shard.tar")
    p.check("spec.model.path", "/models/clip-vit-large-patch14", model=True)
    for escape in ("/models/../etc", "/models-other/x"):
        with pytest.raises(StorageNotAllowed, match=r"model cache /models|'\.\.' segment"):
            p.check("spec.model.path", escape, model=True)
    # embedjob run (no setting): local paths as before, and no prefix restriction without a list.
    AccessPolicy.from_settings(Settings.from_env({})).check("spec.input.uri", "/data/shards/")
    AccessPolicy.from_settings(Settings.from_env({})).check("spec.input.uri", "s3://anything/")


def test_with_an_allow_list_only_the_workers_own_endpoint_may_be_named():
    p = AccessPolicy(allow=(("*", ("s3://b/",)),), endpoint="http://seaweedfs-s3:8333")
    p.check_endpoint("spec.storage.endpoint", None)
    p.check_endpoint("spec.storage.endpoint", "http://seaweedfs-s3:8333/")
    with pytest.raises(StorageNotAllowed, match="only the workers' own S3 endpoint") as e:
        p.check_endpoint("spec.storage.endpoint", "http://s3.evil.example")
    assert e.value.field == "spec.storage.endpoint"
    AccessPolicy(endpoint=None).check_endpoint("spec.storage.endpoint", "http://anything")  # no list: as before


def test_the_namespace_placeholder_the_opt_out_and_the_admins_endpoints():
    p = AccessPolicy.from_settings(Settings.from_env({
        "EMBEDJOB_STORAGE_ALLOW_LIST": json.dumps({"*": ["s3://tenants/{namespace}/"]}),
        "EMBEDJOB_STORAGE_ENDPOINTS": "https://s3.other.example/, http://minio:9000"}))
    p.check("spec.input.uri", "s3://tenants/team-a/in/{0..9}.tar", "team-a")
    p.check("spec.output.uri", "s3://tenants/team-a", "team-a")  # its folder itself
    for uri in ("s3://tenants/team-b/in/", "s3://tenants/team-ab/in/", "s3://tenants/x.tar", "s3://tenants/"):
        with pytest.raises(StorageNotAllowed, match="allowed: s3://tenants/team-a/"):
            p.check("spec.input.uri", uri, "team-a")
    # the workers' view (no trusted namespace): any one namespace's folder, never the bucket's top level
    p.check("task input", "s3://tenants/team-b/in/0.tar")
    with pytest.raises(StorageNotAllowed):
        p.check("task input", "s3://tenants/x.tar")
    p.check_endpoint("spec.storage.endpoint", "https://s3.other.example")
    p.check_endpoint("spec.storage.endpoint", "http://minio:9000/")
    # the opt-out: any S3 location, but the endpoint stays pinned and local paths stay local
    anywhere = AccessPolicy(allow=(("*", ("*",)),), local_paths=False, endpoint="http://seaweedfs-s3:8333")
    anywhere.check("spec.input.uri", "s3://any-bucket/x/", "team-a")
    with pytest.raises(StorageNotAllowed, match="only the workers' own S3 endpoint"):
        anywhere.check_endpoint("spec.storage.endpoint", "http://attacker.example:9000")
    with pytest.raises(StorageNotAllowed, match="local paths"):
        anywhere.check("spec.input.uri", "/etc/", "team-a")
    assert Settings.from_env({"EMBEDJOB_STORAGE_ALLOW_LIST": '{"*": ["*"]}'}).storage_allow_list == (("*", ("*",)),)
    with pytest.raises(ValueError, match="the only placeholder is"):
        Settings.from_env({"EMBEDJOB_STORAGE_ALLOW_LIST": '{"*": ["s3://b/{user}/"]}'})


def test_a_bad_allow_list_setting_fails_the_start_naming_the_variable():
    for raw, why in (("[1]", "expected a JSON object"), ('{"*": "s3://a/"}', "expected a list"),
                     ('{"*": ["/data/"]}', "is not an s3://bucket/prefix"), ("{", "not valid JSON")):
        with pytest.raises(ValueError, match=why) as e:
            Settings.from_env({"EMBEDJOB_STORAGE_ALLOW_LIST": raw})
        assert "EMBEDJOB_STORAGE_ALLOW_LIST" in str(e.value)
    with pytest.raises(ValueError, match="EMBEDJOB_ALLOW_LOCAL_PATHS"):
        Settings.from_env({"EMBEDJOB_ALLOW_LOCAL_PATHS": "maybe"})


def test_a_refusal_is_a_hard_access_failure():
    failure = describe_failure(StorageNotAllowed("task input", "nope"))
    assert failure["errorCode"] == "StorageNotAllowed" and failure["transient"] is False
    assert failure["accessError"] is True  # every shard of such a job fails alike: the job fails fast


# -- the operator, against real Redis and S3 -------------------------------------------------------------------
@pytest.fixture()
def store(redis_url, s3_env):
    r = redis_client(redis_url)
    yield ProgressStore(r, str(uuid.uuid4()))
    r.close()


def _spec(in_bucket: str, out_uri: str, **extra) -> dict:  # noqa: ANN003
    return {"input": {"uri": f"s3://{in_bucket}/in/{{0000..0001}}.tar"}, "output": {"uri": out_uri},
            "queue": "embedjob-allow", **extra}


@pytest.mark.parametrize("field", ["spec.input.uri", "spec.output.uri", "spec.model.path", "spec.input.shards[1]",
                                   "spec.storage.endpoint"])
def test_operator_fails_a_job_outside_its_namespaces_allow_list_naming_the_field(store, bucket, field):
    other = f"o-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=other)  # it exists and is readable: only the allow-list says no
    allowed = AccessPolicy(allow=(("*", ()), ("team-a", (f"s3://{bucket}/",))), local_paths=False,
                           model_dir="/models")
    spec = {"input.uri": _spec(other, f"s3://{bucket}/out/"),
            "output.uri": _spec(bucket, f"s3://{other}/out/"),
            "model.path": _spec(bucket, f"s3://{bucket}/out/", model={"path": "/etc/models/clip"}),
            "input.shards[1]": {"input": {"shards": [f"s3://{bucket}/in/0.tar", f"s3://{other}/in/1.tar"]},
                                "output": {"uri": f"s3://{bucket}/out/"}},
            # an allowed bucket name, but on someone else's S3 service: the credentials would go there
            "storage.endpoint": _spec(bucket, f"s3://{bucket}/out/", storage={"endpoint": "http://s3.evil.example"}),
            }[field.removeprefix("spec.")]
    acc = accept(store, spec, {}, 1, namespace="team-a", policy=allowed)
    assert not acc.ok and acc.status["phase"] == "Failed"
    cond = st.get_condition(acc.status["conditions"], "Failed")
    assert cond["status"] == "True" and cond["reason"] == "StorageNotAllowed"
    assert cond["message"].startswith(f"{field}: ")
    assert [(e.type, e.reason) for e in acc.events] == [("Warning", "StorageNotAllowed")]
    assert store.r.get(store.key("plan")) is None  # nothing planned, nothing will be enqueued
    # The same job in another namespace without an entry is refused too; in team-a, fixed, it is planned.
    if field == "spec.output.uri":
        fixed = _spec(bucket, f"s3://{bucket}/out/")
        assert not accept(store, fixed, {}, 2, namespace="team-b", policy=allowed).ok
        ok = accept(store, fixed, acc.status, 3, namespace="team-a", policy=allowed)
        assert ok.ok and ok.status["phase"] == "Pending" and ok.status["plan"]["total"] == 2


# -- a real worker and forged messages --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-allow"), password=f"pw-{uuid.uuid4().hex}").start()
    yield server
    server.stop()


def test_worker_refuses_forged_messages_and_embeds_the_allowed_one(secured_redis, s3_env, bucket, tiny_clip_dir,
                                                                   tmp_path):
    other = f"o-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=other)
    allowed_in = _put_shard(bucket, "allowed/in/000.tar", simple_shard(3, prefix="a/"))
    foreign_in = _put_shard(other, "in/000.tar", simple_shard(3, prefix="f/"))
    local_in = tmp_path / "local.tar"
    local_in.write_bytes(simple_shard(3, prefix="l/").tar_bytes())
    env = {**os.environ, **s3_env, "EMBEDJOB_REDIS_URL": secured_redis.url,
           "EMBEDJOB_REDIS_PASSWORD": secured_redis.password, "EMBEDJOB_LEASE_SECONDS": "3",
           "EMBEDJOB_STORAGE_ALLOW_LIST": json.dumps({"*": [f"s3://{bucket}/allowed/"]}),
           "EMBEDJOB_ALLOW_LOCAL_PATHS": "false", "EMBEDJOB_MODEL_DIR": str(tiny_clip_dir),
           "EMBEDJOB_MODEL_ALLOW_LIST": json.dumps(["openai/clip-vit-large-patch14"]),
           "OMP_NUM_THREADS": "1"}
    model = {"name": "x", "revision": None, "path": str(tiny_clip_dir)}
    options = {**EmbedOptions().__dict__, "device": "cpu", "dtype": "float32"}
    job = f"job-{uuid.uuid4().hex[:6]}"
    out = f"s3://{bucket}/allowed/out"

    def task(stem: str, shard: str, output: str = out, model: dict = model) -> ShardTask:
        return ShardTask(job=job, shard=shard, stem=stem, output=output, model=model, options=options)

    forged = {
        "foreign": task("foreign", foreign_in),  # another bucket the credentials can read
        "elsewhere": task("elsewhere", allowed_in, output=f"s3://{bucket}/elsewhere"),
        "local": task("local", str(local_in)),
        "model": task("model", allowed_in, model={"name": "x", "revision": None, "path": str(tmp_path)}),
        "modelname": task("modelname", allowed_in, model={"name": str(tmp_path), "revision": None, "path": None}),
        "endpoint": ShardTask(job=job, shard=allowed_in, stem="endpoint", output=out, model=model, options=options,
                              storage={"endpoint": "http://127.0.0.1:9", "region": "us-east-1"}),
        "../../elsewhere/x": task("../../elsewhere/x", allowed_in),  # a stem that climbs out of the output
    }
    # Options beyond this worker's own ceilings (issue 16): refused whatever the operator admitted.
    beyond = {
        "pixels": ShardTask(job=job, shard=allowed_in, stem="pixels", output=out, model=model,
                            options={**options, "max_image_pixels": 10**12}),
        "threads": ShardTask(job=job, shard=allowed_in, stem="threads", output=out, model=model,
                             options={**options, "num_threads": 256}),
        "hub-model": ShardTask(job=job, shard=allowed_in, stem="hub-model", output=out, options=options,
                               model={"name": "evil/model", "revision": "main", "path": None}),
    }
    env_send = {"EMBEDJOB_REDIS_URL": secured_redis.authed_url}  # the forger can write to Redis
    workers = Workers(env, f"q-{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        workers.start("w1")
        for t in [*forged.values(), *beyond.values()]:
            _send(env_send, workers.queue, t)
        _send(env_send, workers.queue, task("good", allowed_in))
        store = ProgressStore(redis_client(secured_redis.authed_url), job)
        _wait_state(store, "good", "succeeded", 180)
        for stem in forged:
            _wait_state(store, stem, "failed", 30)
            info = store.info(stem)
            assert info["errorCode"] == "StorageNotAllowed" and info["transient"] is False, info
            assert info["accessError"] is True, info
        assert "outside the storage allow-list" in store.info("foreign")["error"]
        assert "local paths are not allowed" in store.info("local")["error"]
        assert "model cache" in store.info("model")["error"] and "model cache" in store.info("modelname")["error"]
        assert "only the workers' own S3 endpoint" in store.info("endpoint")["error"]
        assert "'..' segment" in store.info("../../elsewhere/x")["error"]
        for stem in beyond:
            _wait_state(store, stem, "failed", 30)
            info = store.info(stem)
            assert info["errorCode"] == "OptionsNotAllowed" and info["transient"] is False, info
        assert "must be between 1 and 178956970 on this worker" in store.info("pixels")["error"]
        assert "model allow-list" in store.info("hub-model")["error"]
        # Nothing embedded for any forged message; the allowed one, once.
        assert store.executions() == {"good": 1}
        storage = Storage()
        assert list(storage.list(f"s3://{bucket}/elsewhere/")) == []
        assert sorted(storage.list(f"{out}/_manifests/")) == [f"{out}/_manifests/good.json"]
        log = (tmp_path / "w1.log").read_text()
        assert secured_redis.password not in log  # never logged, not even in Celery's banner
        # The worker announces its slots through the protected Redis too (fair dispatch sizes each
        # job's share of the queue from them).
        from embedjob.fairness import live_slots

        assert live_slots(redis_client(secured_redis.authed_url), workers.queue) >= 1
    finally:
        workers.stop_all()
