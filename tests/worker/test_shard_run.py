"""The shard run's outcome recording (embedjob.worker.runtime.shard_run) against REAL Redis."""

from __future__ import annotations

import uuid

from embedjob.progress import ProgressStore, redis_client


def test_an_outcome_retried_after_a_lost_reply_counts_one_commit(redis_url, monkeypatch):
    """Redis applied the write and died before replying (SIGKILL mid-command): the worker retries
    the same write when Redis is back. The commit is recorded once, not twice."""
    import redis as redis_lib

    from embedjob.worker.runtime import shard_run

    store = ProgressStore(redis_client(redis_url), f"job-{uuid.uuid4().hex[:6]}")
    real_execute, lost = redis_lib.client.Pipeline.execute, []

    def execute_then_lose_the_reply(self, *args, **kwargs):
        result = real_execute(self, *args, **kwargs)
        if not lost:
            lost.append(result)
            raise redis_lib.exceptions.ConnectionError("Connection closed by server.")
        return result

    monkeypatch.setattr(redis_lib.client.Pipeline, "execute", execute_then_lose_the_reply)
    shard_run.record_outcome(store, "0003", "succeeded", commit="exec-1", images=5)
    assert lost and store.commits() == {"0003": 1} and store.state("0003") == "succeeded"
    shard_run.record_outcome(store, "0003", "succeeded", commit="exec-2", images=5)  # another execution: counted
    assert store.commits() == {"0003": 2}


def test_embed_task_is_the_shard_without_redis_and_carries_the_batch_size(tmp_path, tiny_clip_dir):
    """What ``embedjob run`` calls in its worker processes: a task message in, committed outputs out;
    the batch size resolved once in the pipeline comes back in the result."""
    from embedjob.contract import EmbedOptions, ShardTask
    from embedjob.worker.model.load import clear_cache
    from embedjob.worker.runtime import shard_run
    from tests.shards import simple_shard

    clear_cache()
    tar = simple_shard(7).write(tmp_path / "s.tar")
    task = ShardTask(job="local", shard=str(tar), stem="s", output=str(tmp_path / "out"),
                     model={"name": "x", "revision": None, "path": str(tiny_clip_dir)},
                     options={**EmbedOptions().__dict__, "device": "cpu", "num_threads": 1})
    options, storage = shard_run.task_inputs(task)
    seen: list[int] = []
    result = shard_run.embed_task(task, options, storage, on_progress=seen.append)
    assert (result.status, result.images, result.batch_size) == ("done", 7, 32)  # 0: 32 on a CPU
    assert seen and seen[-1] == 7 and (tmp_path / "out" / "_manifests" / "s.json").exists()
    clear_cache()
