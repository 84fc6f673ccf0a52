"""A job's score summaries (``status.scores`` and ``_job.json``'s ``scores``), merged while it runs.

With score heads, every finished shard's manifest carries a quantile sketch per score. Each tick
reads the sketches of the finished shards that follow the ones already merged, in plan order, for up
to embedjob.operator.done_before.READ_SECONDS, and adds them to one bounded merger per score held in
the operator's memory. The same order gives the same summaries, whichever operator process merges
and however often it restarts (a new process starts over from the first shard, a slice a tick). A
job with score heads finishes once every shard is merged (embedjob.operator.status.decide_phase):
the finishing tick no longer reads every manifest of the job at once (a million shards: over half
an hour in one tick, the job's deletion waiting on it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from embedjob.operator import done_before
from embedjob.operator.accept import storage_for
from embedjob.operator.events import JobMemory
from embedjob.results import in_order, read_score_sketches
from embedjob.sketch import SketchMerger
from embedjob.spec import JobSpec

log = logging.getLogger("embedjob.operator")


def pending(mem: JobMemory, spec: JobSpec) -> int:
    """Shards of the plan not merged yet (0 for a job without score heads)."""
    return len(mem.plan or []) - mem.sketch_cursor if spec.scores.heads() else 0


def merge_sketches(mem: JobMemory, spec: JobSpec, states: Mapping[str, str],
                   failed_infos: Mapping[str, Mapping[str, Any]], *, seconds: float | None = None,
                   chunk: int | None = None) -> None:
    """Advance ``mem.sketch_cursor`` over the finished shards that follow it (succeeded ones merged;
    ones failed for good passed over), stopping at the first one not finished, whose counts are still
    to be read (embedjob.operator.done_before: its manifest may yet turn out gone), or at the time
    budget."""
    plan = mem.plan or []
    if not spec.scores.heads() or mem.sketch_cursor >= len(plan):
        return
    if not done_before.READERS.acquire(blocking=False):
        return
    try:
        _merge(mem, spec, plan, states, failed_infos,
               done_before.READ_SECONDS if seconds is None else seconds, chunk or done_before.CHUNK)
    finally:
        done_before.READERS.release()


def _merge(mem: JobMemory, spec: JobSpec, plan: list[tuple[str, str]], states: Mapping[str, str],
           failed_infos: Mapping[str, Mapping[str, Any]], seconds: float, chunk: int) -> None:
    storage = storage_for(spec)
    deadline = time.monotonic() + seconds
    while mem.sketch_cursor < len(plan):
        run: list[str] = []  # the next finished shards, in plan order
        end = mem.sketch_cursor
        while end < len(plan) and len(run) < chunk:
            stem = plan[end][0]
            state = states.get(stem)
            if state == "succeeded" and stem not in mem.counts_pending:
                run.append(stem)
            elif not (state == "failed" and failed_infos.get(stem, {}).get("final")):
                break
            end += 1
        if end == mem.sketch_cursor:
            return
        try:
            sketches = list(in_order(lambda stem: read_score_sketches(spec.output.uri, stem, storage), run))
        except Exception as e:  # noqa: BLE001 - merged on a later tick from the same shard on
            log.warning("job %s: cannot read score sketches yet: %s", spec.output.uri, e)
            return
        for per_shard in sketches:
            for name, sketch in (per_shard or {}).items():
                mem.sketches.setdefault(name, SketchMerger()).add(sketch)
        mem.sketch_cursor = end
        if time.monotonic() >= deadline:
            return


def summaries(mem: JobMemory) -> dict[str, dict[str, Any]]:
    """``{score: summary}`` of everything merged so far."""
    return {name: m.result().summary() for name, m in sorted(mem.sketches.items())}
