"""`embedjob run` / `embedjob demo` as a user runs them: real subprocesses, real SeaweedFS, real files."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

import embedjob
from embedjob.dev.services import embedjob_command
from embedjob.layout import shard_outputs
from embedjob.results import done_stems
from embedjob.storage import Storage, s3_client
from tests.shards import simple_shard


def embedjob_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(embedjob_command(*args), capture_output=True, text=True, env=full_env, timeout=timeout)


def write_job(path: Path, spec: dict, name: str = "t") -> Path:
    doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob", "metadata": {"name": name}, "spec": spec}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_run_local_folder_resume_and_read_back(tmp_path, tiny_clip_dir):
    shards = {"a/00000": simple_shard(5, seed=1), "a/00001": simple_shard(3, seed=2),
              "b/00000": simple_shard(4, seed=3)}
    for stem, s in shards.items():
        s.write(tmp_path / "in" / f"{stem}.tar")
    bad = simple_shard(2, seed=4)
    bad.members.insert(1, ("corrupt.jpg", b"\xff\xd8\xff garbage"))
    bad.write(tmp_path / "in" / "b" / "00001.tar")
    job = write_job(tmp_path / "job.yaml", {
        "input": {"uri": "in/"}, "output": {"uri": "out/", "dtype": "float32"},
        "model": {"path": str(tiny_clip_dir)}, "inference": {"device": "cpu", "batchSize": 4},
    })

    r = embedjob_cli("run", str(job), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "4 shards, 0 already done, 4 to run" in r.stderr
    assert "img/s" in r.stderr  # the live progress bar
    assert "14 embedded, 1 skipped" in r.stdout

    out = str(tmp_path / "out")
    assert done_stems(out) == {"a/00000", "a/00001", "b/00000", "b/00001"}
    keys, emb = embedjob.read_embeddings(out)
    expected = shards["a/00000"].good_keys + shards["a/00001"].good_keys + shards["b/00000"].good_keys + bad.good_keys
    assert keys == expected and emb.shape == (14, 32) and emb.dtype == np.float32
    k1, e1 = embedjob.read_embeddings(out, shard="a/00001")
    assert k1 == shards["a/00001"].good_keys and e1.shape == (3, 32)
    manifest = json.loads((tmp_path / "out/_manifests/b/00001.json").read_text())
    assert [f["key"] for f in manifest["failed"]] == ["corrupt"]
    job_manifest = json.loads((tmp_path / "out/_job.json").read_text())
    assert job_manifest["totals"] == {"shards": 4, "succeeded": 4, "failed": 0, "images": 14, "failedImages": 1,
                                      "truncatedShards": 0, "imagesThisRun": 14, "shardsThisRun": 4}

    # A rerun resumes: every shard is already done, nothing is rewritten.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.npy")}
    r = embedjob_cli("run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "4 shards, 4 already done, 0 to run" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.npy")} == before
    # Partial progress: remove one manifest -> exactly that shard is redone.
    (tmp_path / "out/_manifests/a/00001.json").unlink()
    r = embedjob_cli("run", str(job), "--no-progress")
    assert "4 shards, 3 already done, 1 to run" in r.stderr and r.returncode == 0


def test_run_s3_pattern_and_failure_policy(tmp_path, bucket, s3_env, tiny_clip_dir):
    client = s3_client()
    good = [simple_shard(3, seed=i) for i in range(3)]
    for i, s in enumerate(good):
        client.put_object(Bucket=bucket, Key=f"ds/{i:03d}.tar", Body=s.tar_bytes())
    client.put_object(Bucket=bucket, Key="ds/003.tar", Body=b"this is not a tar file" * 100)
    spec = {
        "input": {"uri": f"s3://{bucket}/ds/{{000..003}}.tar"}, "output": {"uri": f"s3://{bucket}/emb/"},
        "model": {"path": str(tiny_clip_dir)}, "inference": {"device": "cpu"},
        "retries": {"perShard": 1, "backoffSeconds": 0}, "maxFailedShards": 0,
    }
    r = embedjob_cli("run", str(write_job(tmp_path / "job.yaml", spec)), "--no-progress", env=s3_env)
    assert r.returncode == 1, r.stdout + r.stderr
    # not a tar: a permanent error, one attempt whatever retries are left
    assert "shard 003 FAILED (permanent error, not retried)" in r.stderr and "failed shard 003" in r.stdout
    storage = Storage()
    assert done_stems(f"s3://{bucket}/emb/") == {"000", "001", "002"}
    assert not storage.exists(f"s3://{bucket}/emb/_job.json")  # the job failed: no job manifest
    assert not storage.exists(shard_outputs(f"s3://{bucket}/emb/", "003").embeddings)
    assert list(storage.list(f"s3://{bucket}/emb/_tmp/")) == []

    # The same failure within maxFailedShards: the job succeeds, and the job manifest lists it.
    r = embedjob_cli("run", str(write_job(tmp_path / "job.yaml", {**spec, "maxFailedShards": 1})), "--no-progress",
                     env=s3_env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 already done, 1 to run" in r.stderr
    job_manifest = json.loads(storage.read_bytes(f"s3://{bucket}/emb/_job.json"))
    assert job_manifest["totals"]["failed"] == 1
    assert [s["stem"] for s in job_manifest["shards"] if s["state"] == "failed"] == ["003"]


def test_run_with_text_outputs_on_s3_and_read_back(tmp_path, bucket, s3_env, text_clip_dir):
    """spec.outputs: [image, text] end to end: shards streamed from S3, text_emb/ beside img_emb/, rows
    aligned with the metadata, read back with kind="text"."""
    import pyarrow.parquet as pq

    from tests.shards import caption_shard

    client = s3_client()
    caps, plain = caption_shard(), simple_shard(3, seed=7)
    client.put_object(Bucket=bucket, Key="ds/000.tar", Body=caps.tar_bytes())
    client.put_object(Bucket=bucket, Key="ds/001.tar", Body=plain.tar_bytes())
    out = f"s3://{bucket}/emb/"
    spec = {"input": {"uri": f"s3://{bucket}/ds/"}, "output": {"uri": out, "dtype": "float32"},
            "model": {"path": str(text_clip_dir)}, "inference": {"device": "cpu", "batchSize": 4},
            "outputs": ["image", "text"]}
    r = embedjob_cli("run", str(write_job(tmp_path / "job.yaml", spec)), "--no-progress", env=s3_env)
    assert r.returncode == 0, r.stdout + r.stderr

    keys, img = embedjob.read_embeddings(out, endpoint=s3_env["AWS_ENDPOINT_URL"])
    tkeys, txt = embedjob.read_embeddings(out, endpoint=s3_env["AWS_ENDPOINT_URL"], kind="text")
    assert keys == tkeys == caps.good_keys + plain.good_keys and img.shape == txt.shape == (len(keys), 32)
    storage = Storage()
    meta = pq.read_table(io.BytesIO(storage.read_bytes(shard_outputs(out, "000").metadata))).to_pylist()
    assert [m["key"] for m in meta] == caps.good_keys
    has = np.array([m["has_caption"] for m in meta])
    assert not txt[: len(meta)][~has].any() and np.allclose(np.linalg.norm(txt[: len(meta)][has], axis=1), 1, atol=1e-5)
    scores = np.einsum("ij,ij->i", img[: len(meta)], txt[: len(meta)])
    assert np.allclose([m["clip_score"] for m in meta if m["has_caption"]], scores[has], atol=1e-6)
    manifest = json.loads(storage.read_bytes(shard_outputs(out, "001").manifest))
    assert manifest["text"]["captions"] == 3 and manifest["text"]["truncated"] == 0


def test_run_with_text_outputs_and_score_heads_in_one_pass(tmp_path, text_clip_dir):
    """outputs: [image, text] and spec.scores together: one pass writes both embeddings, the parquet
    holds the fixed columns, has_caption and clip_score, then the scores; each score is the head run
    by plain torch on the .npy rows; the report shows all three histograms."""
    import pyarrow.parquet as pq
    import torch

    from embedjob.worker.model.heads import AestheticMLP
    from embedjob.worker.model.random_weights import save_random_heads
    from tests.shards import caption_shard

    heads = save_random_heads(tmp_path / "heads", width=32)
    (tmp_path / "ds").mkdir()
    caps = caption_shard()
    (tmp_path / "ds" / "000.tar").write_bytes(caps.tar_bytes())
    out = tmp_path / "emb"
    spec = {"input": {"uri": str(tmp_path / "ds")}, "output": {"uri": str(out), "dtype": "float32"},
            "model": {"path": str(text_clip_dir)}, "inference": {"device": "cpu", "batchSize": 4},
            "outputs": ["image", "text"], "scores": {"aesthetic": {"path": str(heads["aesthetic"])},
                                                     "nsfw": {"path": str(heads["nsfw"])}}}
    r = embedjob_cli("run", str(write_job(tmp_path / "job.yaml", spec)), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr

    table = pq.read_table(out / "metadata" / "000.parquet")
    assert table.column_names == ["key", "shard", "member", "width", "height", "caption", "json", "has_caption",
                                  "clip_score", "aesthetic", "nsfw"]
    img, txt = np.load(out / "img_emb" / "000.npy"), np.load(out / "text_emb" / "000.npy")
    assert table.column("key").to_pylist() == caps.good_keys and img.shape == txt.shape == (len(caps.good_keys), 32)
    has = np.array(table.column("has_caption").to_pylist())
    clip = np.array([x for x in table.column("clip_score").to_pylist() if x is not None])
    np.testing.assert_allclose(clip, np.einsum("ij,ij->i", img, txt)[has], atol=1e-6)
    mlp = AestheticMLP(32).eval()
    mlp.load_state_dict(torch.load(heads["aesthetic"], weights_only=True))
    with torch.no_grad():
        want = mlp(torch.from_numpy(img)).squeeze(1).numpy()
    np.testing.assert_allclose(table.column("aesthetic").to_numpy(), want, atol=1e-6)

    html = tmp_path / "report.html"
    r = embedjob_cli("report", str(out), "--html", str(html))
    assert r.returncode == 0, r.stdout + r.stderr
    page = html.read_text()
    assert all(name in page for name in ("clip_score", "aesthetic", "nsfw"))


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"input": {"uri": "in/"}, "output": {"uri": "out/"}, "inference": {"batchSize": -1}},
         "spec.inference.batchSize"),
        ({"input": {"uri": "in/"}}, "spec.output"),
        ({"input": {"uri": "empty/"}, "output": {"uri": "out/"}}, "spec.input.uri"),
    ],
)
def test_bad_job_rejected_before_any_work(tmp_path, spec, field):
    simple_shard(1).write(tmp_path / "in" / "0.tar")
    (tmp_path / "empty").mkdir()
    r = embedjob_cli("run", str(write_job(tmp_path / "job.yaml", spec)))
    assert r.returncode == 2
    assert field in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_demo_runs_offline_and_says_so(tmp_path):
    r = embedjob_cli("demo", "--output", str(tmp_path / "demo"), "--no-progress", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "RANDOM-WEIGHT" in r.stdout and "NOT meaningful" in r.stdout
    keys, emb = embedjob.read_embeddings(str(tmp_path / "demo"))
    assert len(keys) == 33 and emb.shape[0] == 33
    doc = json.loads((tmp_path / "demo/_job.json").read_text())
    assert doc["randomWeights"] is True
    # the model as what it is (a local folder), never the hub id the demo could not load
    assert "id" not in doc["model"] and doc["model"]["path"].endswith("RANDOM-WEIGHTS-tiny-clip")
    # the metadata's shard column names the real shard file, not the editable install's link farm
    import pyarrow.parquet as pq

    shard_paths = set(pq.read_table(tmp_path / "demo/metadata/00000.parquet").column("shard").to_pylist())
    assert len(shard_paths) == 1
    (path,) = shard_paths
    assert "__editable__" not in path and Path(path).is_file() and not Path(path).is_symlink()


def test_local_workers_are_placed_per_gpu_with_their_share_of_the_cpus():
    """`embedjob run --processes-per-gpu 2` on a 2-GPU machine: 4 workers, two on each GPU, each on its
    own CPUs (played here with the placement the runner gives its spawned processes; each task asks
    a shell, which inherits the worker's environment and CPU affinity)."""
    import functools
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from embedjob.cli.run import _init_worker

    cpus = sorted(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    placement = {"workers": 4, "per_gpu": 2, "gpus": ["GPU-a", "GPU-b"], "cpus": cpus, "counter": ctx.Value("i", 0)}
    probe = functools.partial(subprocess.check_output, [
        "sh", "-c",
        "sleep 0.5; echo $PPID $CUDA_VISIBLE_DEVICES $(grep Cpus_allowed_list /proc/self/status | cut -f2)"],
        text=True)
    with ProcessPoolExecutor(4, mp_context=ctx, initializer=_init_worker, initargs=(None, None, placement)) as pool:
        futures = [pool.submit(probe) for _ in range(8)]
        seen = {pid: (gpu, allowed) for pid, gpu, allowed in (f.result().split() for f in futures)}
    assert len(seen) == 4, seen
    assert sorted(g for g, _ in seen.values()) == ["GPU-a", "GPU-a", "GPU-b", "GPU-b"]
    if len(cpus) >= 4:  # each its own CPUs
        assert len({a for _, a in seen.values()}) == 4, seen


def test_run_with_two_processes_on_one_device(tmp_path, tiny_clip_dir):
    for i in range(4):
        simple_shard(6, seed=10 + i).write(tmp_path / "in" / f"{i:05d}.tar")
    job = write_job(tmp_path / "job.yaml", {
        "input": {"uri": "in/"}, "output": {"uri": "out/", "dtype": "float32"},
        "model": {"path": str(tiny_clip_dir)}, "inference": {"device": "cpu", "batchSize": 4},
    })
    r = embedjob_cli("run", str(job), "--processes-per-gpu", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "24 embedded" in r.stdout
    keys, emb = embedjob.read_embeddings(str(tmp_path / "out"))
    assert emb.shape == (24, 32) and len(keys) == 24
    assert embedjob_cli("run", str(job), "--processes-per-gpu", "0").returncode == 2


def _local_job(tmp_path: Path, model_dir: Path, n_shards: int = 3, **spec: object) -> Path:
    for i in range(n_shards):
        simple_shard(4 + i, seed=10 + i).write(tmp_path / "in" / f"{i:05d}.tar")
    return write_job(tmp_path / "job.yaml", {
        "input": {"uri": "in/"}, "output": {"uri": "out/"}, "model": {"path": str(model_dir)},
        "inference": {"device": "cpu", "batchSize": 4}, **spec})


def test_job_totals_describe_the_output_after_a_full_and_a_partial_rerun(tmp_path, tiny_clip_dir):
    """_job.json and the summary count every shard present, earlier runs included; the rate counts
    only what this run embedded."""
    job = _local_job(tmp_path, tiny_clip_dir)  # 4 + 5 + 6 = 15 images
    assert embedjob_cli("run", str(job), "--no-progress").returncode == 0
    first = json.loads((tmp_path / "out/_job.json").read_text())
    assert first["totals"]["images"] == 15 and first["totals"]["imagesThisRun"] == 15

    r = embedjob_cli("run", str(job), "--no-progress")  # a full rerun: nothing to do
    assert r.returncode == 0, r.stderr
    assert "15 embedded, 0 skipped (recorded in the manifests; 0 embedded by this run)" in r.stdout
    totals = json.loads((tmp_path / "out/_job.json").read_text())["totals"]
    assert (totals["shards"], totals["succeeded"], totals["images"], totals["imagesThisRun"]) == (3, 3, 15, 0)
    doc = json.loads((tmp_path / "out/_job.json").read_text())
    assert doc["timings"]["imagesPerSecond"] == 0 and doc["timings"]["rateCounts"] == "images embedded by this run"
    assert all(s["images"] for s in doc["shards"])  # every shard with its own counts, earlier runs included

    (tmp_path / "out/_manifests/00001.json").unlink()  # a partial resume: only 00001 (5 images) is redone
    r = embedjob_cli("run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "15 embedded, 0 skipped (recorded in the manifests; 5 embedded by this run)" in r.stdout, r.stdout
    totals = json.loads((tmp_path / "out/_job.json").read_text())["totals"]
    assert (totals["images"], totals["imagesThisRun"], totals["shardsThisRun"]) == (15, 5, 1)


def test_truncated_shard_record_then_retry_and_fail(tmp_path, tiny_clip_dir):
    """record (the default): the samples before the damage are kept, and the loss is in the summary,
    _job.json and the shard's manifest; --retry-truncated redoes it; fail: the shard fails at once,
    nothing committed, exit 1."""
    job = _local_job(tmp_path, tiny_clip_dir, n_shards=2)
    whole = (tmp_path / "in/00001.tar").read_bytes()
    (tmp_path / "in/00001.tar").write_bytes(whole[: len(whole) // 2])  # the upload was cut short

    r = embedjob_cli("run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "OK WITH DATA LOSS (1 truncated shard)" in r.stdout and "truncated shard 00001: tar truncated" in r.stdout
    doc = json.loads((tmp_path / "out/_job.json").read_text())
    assert doc["totals"]["truncatedShards"] == 1 and doc["dataLoss"] == {"truncatedShards": ["00001"]}
    assert [s["stem"] for s in doc["shards"] if s.get("tarError")] == ["00001"]
    kept = doc["totals"]["images"]
    assert 4 <= kept < 4 + 5

    # A plain rerun keeps it (done) but still reports the loss; --retry-truncated redoes it.
    r = embedjob_cli("run", str(job), "--no-progress")
    assert "0 to run" in r.stderr and "OK WITH DATA LOSS" in r.stdout
    (tmp_path / "in/00001.tar").write_bytes(whole)  # the source is fixed
    r = embedjob_cli("run", str(job), "--no-progress", "--retry-truncated")
    assert r.returncode == 0 and "1 already done, 1 to run (1 truncated, retried)" in r.stderr, r.stderr
    doc = json.loads((tmp_path / "out/_job.json").read_text())
    assert doc["totals"]["truncatedShards"] == 0 and doc["totals"]["images"] == 9 and "OK\n" in r.stdout

    # onTruncatedShard: fail: one attempt (a permanent error), nothing committed for that shard.
    (tmp_path / "in/00001.tar").write_bytes(whole[: len(whole) // 2])
    job = write_job(tmp_path / "job.yaml", {**yaml.safe_load(job.read_text())["spec"], "onTruncatedShard": "fail",
                                           "output": {"uri": "out2/"}, "retries": {"backoffSeconds": 30}})
    r = embedjob_cli("run", str(job), "--no-progress")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "shard 00001 FAILED (permanent error, not retried)" in r.stderr and "onTruncatedShard: fail" in r.stderr
    assert done_stems(str(tmp_path / "out2")) == {"00000"}
    assert not (tmp_path / "out2/img_emb/00001.npy").exists()


def test_unreadable_tar_fails_in_seconds_not_minutes(tmp_path, tiny_clip_dir):
    """Not a tar, with the README's retries (3, backoff 30 s): one attempt, not 30 + 60 + 120 s of backoff."""
    import time

    job = _local_job(tmp_path, tiny_clip_dir, n_shards=1, retries={"perShard": 3, "backoffSeconds": 30})
    (tmp_path / "in/00009.tar").write_bytes(b"this is not a tar file" * 100)
    t = time.monotonic()
    r = embedjob_cli("run", str(job), "--no-progress")
    assert r.returncode == 1, r.stdout + r.stderr
    assert time.monotonic() - t < 25  # the time of one run (model load + two small shards), no backoff
    assert "shard 00009 FAILED (permanent error, not retried): TarOpenError" in r.stderr
    assert "retrying" not in r.stderr and "failed shard 00009" in r.stdout


def test_local_model_provenance_is_its_folder_and_content_hash_never_a_hub_id(tmp_path, tiny_clip_dir):
    """model.path and no model.name: the manifests and _job.json record the folder, the family and
    dim, and a hash of the weights that does not depend on the folder's name; no hub id or revision."""
    import shutil

    from embedjob.spec import DEFAULT_MODEL, DEFAULT_REVISION

    copy = tmp_path / "any-name-at-all"
    shutil.copytree(tiny_clip_dir, copy)
    hashes = []
    for i, folder in enumerate((tiny_clip_dir, copy)):
        job = _local_job(tmp_path / f"run{i}", folder, n_shards=1)
        r = embedjob_cli("run", str(job), "--no-progress")
        assert r.returncode == 0, r.stderr
        out = tmp_path / f"run{i}" / "out"
        manifest = json.loads((out / "_manifests/00000.json").read_text())["model"]
        recorded = json.loads((out / "_job.json").read_text())
        text = json.dumps(manifest) + json.dumps(recorded)
        assert DEFAULT_MODEL not in text and DEFAULT_REVISION not in text
        assert "id" not in manifest and "revision" not in manifest
        assert manifest["path"] == str(folder.resolve()) and manifest["dim"] == 32
        assert manifest["family"].startswith("clip ViT")
        assert len(manifest["weightsSha256"]) == 64
        assert recorded["model"] == {k: manifest[k] for k in ("path", "family", "dim", "weightsSha256")}
        hashes.append(manifest["weightsSha256"])
    assert hashes[0] == hashes[1]  # the same weights under another folder name


def test_model_that_cannot_be_loaded_is_one_clear_error_with_its_own_exit_code(tmp_path):
    """The README's model.name with no hub (HF_HUB_OFFLINE, or the hub unreachable) and an empty cache:
    validate and run each fail at once with one message naming spec.model.name and what to set,
    exit 3 (not 2, the bad-file code); a missing model.path names spec.model.path."""
    import time

    simple_shard(1).write(tmp_path / "in" / "0.tar")
    job = write_job(tmp_path / "job.yaml", {"input": {"uri": "in/"}, "output": {"uri": "out/"},
                                            "model": {"name": "openai/clip-vit-large-patch14"}})
    env = {"EMBEDJOB_MODEL_DIR": str(tmp_path / "empty-cache")}
    for offline in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):  # unreachable: port 9
        for cmd in ("validate", "run"):
            t = time.monotonic()
            r = embedjob_cli(cmd, str(job), env={**env, **offline})
            assert r.returncode == 3, (cmd, r.stdout, r.stderr)
            assert time.monotonic() - t < 20  # no hub retries
            errors = [line for line in r.stderr.splitlines() if line.strip()]
            assert len(errors) == 1 and errors[0].startswith("error: the model cannot be loaded here: spec.model.name:")
            assert "embedjob model fetch openai/clip-vit-large-patch14" in errors[0] and "spec.model.path" in errors[0]
    assert not (tmp_path / "out").exists()
    r = embedjob_cli("model", "fetch", env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 3 and "HF_HUB_OFFLINE is set" in r.stderr

    missing = write_job(tmp_path / "job.yaml", {"input": {"uri": "in/"}, "output": {"uri": "out/"},
                                                "model": {"path": "/nonexistent/model"}})
    for cmd in ("validate", "run"):
        r = embedjob_cli(cmd, str(missing))
        assert r.returncode == 3 and "spec.model.path: /nonexistent/model does not exist" in r.stderr, r.stderr


def test_model_name_from_a_filled_cache_runs_offline(tmp_path, tiny_clip_dir):
    """The offline recipe: a model cache filled ahead (what `embedjob model fetch` writes: the hub's
    cache layout), HF_HUB_OFFLINE=1, and model.name: validate says where it loads from, run uses it
    with no hub, and the records name the hub id and revision that were really loaded."""
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "cache"
    snapshot = cache / "models--test--tiny-clip" / "snapshots" / revision
    shutil.copytree(tiny_clip_dir, snapshot)
    simple_shard(3).write(tmp_path / "in" / "0.tar")
    job = write_job(tmp_path / "job.yaml", {"input": {"uri": "in/"}, "output": {"uri": "out/"},
                                            "model": {"name": "test/tiny-clip", "revision": revision},
                                            "inference": {"device": "cpu"}})
    env = {"EMBEDJOB_MODEL_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    r = embedjob_cli("validate", str(job), env=env)
    assert r.returncode == 0 and f"model: test/tiny-clip at revision {revision} from the model cache" in r.stdout
    r = embedjob_cli("run", str(job), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    model = json.loads((tmp_path / "out/_job.json").read_text())["model"]
    assert (model["id"], model["revision"], model["dim"]) == ("test/tiny-clip", revision, 32)
