"""The report task (embedjob.worker.runtime.report_run): report.html under the output, thumbnails only
from the job's planned input shards, a message for another output refused."""

from __future__ import annotations

import json
import uuid

from embedjob.progress import ProgressStore, redis_client
from embedjob.worker.runtime.report_run import run_report


def _page_data(html: str) -> dict:
    return json.loads(html.split('id="report-data">', 1)[1].split("</script>", 1)[0])


def test_report_task_writes_report_html_with_thumbnails_from_planned_shards_only(redis_url, scored_output):
    out = str(scored_output["output"])
    shards = sorted(str(p) for p in scored_output["input"].glob("*.tar"))
    store = ProgressStore(redis_client(redis_url), f"job-{uuid.uuid4().hex[:6]}")
    planned = shards[:10]  # the other ten are not the job's (as if the metadata named foreign shards)
    store.save_plan({"output": {"uri": out}}, [(s.rsplit("/", 1)[-1][:-4], s) for s in planned], {})
    page = scored_output["output"] / "report.html"
    kept = page.read_bytes() if page.exists() else None  # the fixture's, put back after
    try:
        result = run_report({"job": store.job, "output": out, "storage": {}}, store.r)
        assert result == {"status": "done", "uri": f"{out}/report.html"}
        assert store.report_outcome()["state"] == "Written" and store.report_outcome()["uri"] == result["uri"]
        data = _page_data(page.read_text())
    finally:
        if kept is not None:
            page.write_bytes(kept)
    thumbs = [t for groups in data["thumbnails"].values() for items in groups.values() for t in items]
    shard_of = {t["key"]: shards[int(t["key"][1:3])] for t in thumbs}  # keys are s<NN>-<i>
    assert thumbs and any(shard_of[t["key"]] not in planned for t in thumbs)
    for t in thumbs:
        assert (t["src"] is not None) == (shard_of[t["key"]] in planned), t["key"]


def test_report_task_for_another_output_is_refused(redis_url, scored_output, tmp_path):
    page = scored_output["output"] / "report.html"
    kept = page.read_bytes() if page.exists() else None
    page.unlink(missing_ok=True)
    try:
        store = ProgressStore(redis_client(redis_url), f"job-{uuid.uuid4().hex[:6]}")
        store.save_plan({"output": {"uri": str(tmp_path / "elsewhere")}}, [], {})
        result = run_report({"job": store.job, "output": str(scored_output["output"]), "storage": {}}, store.r)
        assert result["status"] == "failed" and "is not the job's" in result["error"]
        assert store.report_outcome()["state"] == "Failed" and "is not the job's" in store.report_outcome()["error"]
        assert not page.exists()
    finally:
        if kept is not None:  # the fixture's page, as `embedjob run` wrote it (tests/test_report.py reads it)
            page.write_bytes(kept)
