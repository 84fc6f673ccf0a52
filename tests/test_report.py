"""`embedjob report`: the page built from a real scored 20-shard output and from the demo's, opened in
headless Chromium (the Debian package scripts/setup.sh installs; without it these tests fail, they do
not skip)."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedjob.dev.services import embedjob_command
from embedjob.report_page import render
from embedjob.report_scores import HIST_BINS
from tests.browser import Browser


def scores_of(output) -> dict[str, np.ndarray]:
    tables = [pq.read_table(p) for p in sorted((output / "metadata").glob("*.parquet"))]
    return {s: np.concatenate([t.column(s).to_numpy() for t in tables]) for s in ("aesthetic", "nsfw")}


@pytest.fixture(scope="module")
def report_page(scored_output, tmp_path_factory):
    html = tmp_path_factory.mktemp("report") / "report.html"
    r = subprocess.run(embedjob_command("report", str(scored_output["output"]), "--html", str(html)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return html


@pytest.fixture(scope="module")
def page(report_page):
    with Browser() as b:
        b.open(report_page.as_uri())
        assert b.js("document.body.dataset.ready") == "1"
        yield b


def test_embedjob_run_writes_the_report_when_output_report_is_set(scored_output, report_page):
    """The fixture's job has output.report: true: `embedjob run` wrote the same page under the output."""
    written = scored_output["output"] / "report.html"
    strip = lambda html: html.split('"throughput"', 1)[0]  # noqa: E731 - timings differ between builds
    assert strip(written.read_text()) == strip(report_page.read_text())


def test_totals_and_failed_reasons(page, scored_output):
    totals = page.js("Object.fromEntries([...document.querySelectorAll('[data-total]')].map("
                     "c => [c.dataset.total, c.querySelector('b').textContent]))")
    assert totals["images"] == str(scored_output["images"]) and totals["failed samples"] == "1"
    assert totals["shards done"] == "20 / 20"
    reasons = page.js("[...document.querySelectorAll('#failed-reasons td')].map(td => td.textContent)")
    assert len(reasons) == 2 and reasons[1] == "1"


def test_model_and_heads_are_tables_of_what_the_manifests_record(page, scored_output):
    """The model block a person reads: one row per field, the values the shards' manifests record
    (the model's identity, its weights' hash), and one column per score head."""
    import json

    manifest = json.loads(next((scored_output["output"] / "_manifests").glob("*.json")).read_text())
    model = page.js("Object.fromEntries([...document.querySelectorAll('#model-table tr[data-field]')].map("
                    "tr => [tr.dataset.field, tr.querySelector('td').textContent]))")
    assert model["family"] == manifest["model"]["family"] and model["dim"] == "768"
    assert model["weightsSha256"] == manifest["model"]["weightsSha256"] and model["path"]
    heads = page.js("[...document.querySelectorAll('#heads-table tr:first-child th')].map(th => th.textContent)")
    assert heads == ["field", *sorted(manifest["scores"])]
    sha = page.js("[...document.querySelectorAll('#heads-table tr[data-field=sha256] td')].map(td => td.textContent)")
    assert sha == [manifest["scores"][name]["sha256"] for name in sorted(manifest["scores"])]
    assert page.js("document.querySelectorAll('pre').length") == 0  # no raw JSON left on the page


@pytest.mark.parametrize("score", ["aesthetic", "nsfw"])
def test_histogram_counts_are_the_scores(page, scored_output, score):
    values = scores_of(scored_output["output"])[score].astype(np.float64)
    expected, _ = np.histogram(values, bins=HIST_BINS, range=(values.min(), values.max()))
    bars = page.js(f"[...document.querySelectorAll('svg[data-score={score}] rect.bar')].map(r => +r.dataset.count)")
    assert bars == expected.tolist() and sum(bars) == scored_output["images"]


def test_moving_the_slider_changes_the_kept_count(page, scored_output):
    values = scores_of(scored_output["output"])["aesthetic"].astype(np.float64)
    assert page.js("+document.getElementById('kept-aesthetic').dataset.kept") == values.size  # >= the minimum
    kept = page.js("""(() => { const s = document.getElementById('slider-aesthetic');
        s.value = Math.round(s.max / 2); s.dispatchEvent(new Event('input'));
        return [+document.getElementById('kept-aesthetic').dataset.kept,
                +document.getElementById('kept-aesthetic').parentElement.dataset.threshold]; })()""")
    assert 0 < kept[0] < values.size
    assert kept[0] == int((values >= kept[1]).sum())
    # nsfw keeps what is below the threshold
    kept_nsfw = page.js("""(() => { const s = document.getElementById('slider-nsfw');
        s.value = 0; s.dispatchEvent(new Event('input'));
        return +document.getElementById('kept-nsfw').dataset.kept; })()""")
    assert kept_nsfw == 0


def test_every_thumbnail_loads(page):
    thumbs = page.js("""Promise.all([...document.querySelectorAll('.thumbs img')].map(img =>
        img.decode().then(() => [img.dataset.loaded, img.naturalWidth, img.dataset.member],
                          () => ['failed', 0, img.dataset.member])))""")
    assert len(thumbs) == 2 * 3 * 4  # two scores x lowest, median, highest x 4
    assert all(loaded == "1" and width > 0 for loaded, width, _ in thumbs), thumbs
    assert all(member.endswith(".jpg") for _, _, member in thumbs)


def test_no_external_requests_and_a_screenshot_renders(page, tmp_path, report_page):
    assert page.requests and all(u.startswith(("file://", "data:")) for u in page.requests), page.requests
    png = page.screenshot(tmp_path / "report.png")
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.width >= 1000 and img.height >= 900
    assert len(img.getcolors(1 << 20) or []) > 50  # drawn: bars, text, thumbnails; not a blank page


def test_the_page_data_cannot_close_its_script_element():
    page = render({"output": "</script><script>alert(1)</script>", "job": None, "totals": {}, "panels": {}})
    assert "</script><script>alert(1)" not in page


def test_report_of_the_demo_output(tmp_path):
    """The demo's output (no score heads): the page still renders its totals, with no score panel."""
    import json
    import os

    out, html = tmp_path / "demo", tmp_path / "demo.html"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDJOB_MODEL_DIR": str(tmp_path / "models"),
           "OMP_NUM_THREADS": "1"}
    cli = embedjob_command()
    r = subprocess.run([*cli, "demo", "--output", str(out), "--no-progress", "--workers", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "report", str(out), "--html", str(html)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    images = json.loads((out / "_job.json").read_text())["totals"]["images"]
    with Browser() as b:
        b.open(html.as_uri())
        assert b.js("document.body.dataset.ready") == "1"
        assert b.js("document.querySelector('[data-total=images] b').textContent") == f"{images:,}"
        assert b.js("document.querySelectorAll('.panel').length") == 0
        assert all(u.startswith(("file://", "data:")) for u in b.requests), b.requests


def test_clip_score_column_gets_its_histogram_and_thumbnails(tmp_path):
    """An output whose metadata has a clip_score column (text outputs): its panel, from the column."""
    import json

    import pyarrow as pa

    from embedjob.report import build_report
    from embedjob.storage import Storage
    from tests.shards import simple_shard

    shard = simple_shard(5, seed=3, size=(64, 48)).write(tmp_path / "in" / "00000.tar")
    keys = [f"{i:06d}" for i in range(5)]
    out = tmp_path / "out"
    (out / "metadata").mkdir(parents=True)
    (out / "_manifests").mkdir()
    clip = np.array([0.31, 0.12, 0.25, 0.28, 0.05], np.float32)
    pq.write_table(pa.table({"key": keys, "shard": [str(shard)] * 5, "member": [f"{k}.jpg" for k in keys],
                             "clip_score": clip}), out / "metadata" / "00000.parquet")
    (out / "_manifests" / "00000.json").write_text(json.dumps({"counts": {"embedded": 5, "failed": 0}}))
    page = build_report(str(out), Storage())
    data = json.loads(page.split('id="report-data">', 1)[1].split("</script>", 1)[0])
    panel = data["panels"]["clip_score"]
    assert sum(panel["counts"]) == 5 and panel["keepAbove"] and panel["atOrAbove"][0] == 5
    lowest = data["thumbnails"]["clip_score"]["lowest"]
    assert [t["key"] for t in lowest] == ["000004", "000001", "000002", "000003"]
    assert all(t["src"].startswith("data:image/jpeg;base64,") for t in lowest)


def test_planted_output_files_are_left_out_of_the_report(scored_output, tmp_path, monkeypatch):
    """The report runs on a shared worker and reads the job owner's output. Planted there: a `_job.json`
    nested past the parser's depth, a shard manifest that is a list, one whose model id is 3 MB, a
    metadata file of more rows than the report reads (its cap lowered for the test) and one that is not
    parquet. The page is still built, from the other shards: their images, their scores, no planted model."""
    import json
    import shutil

    import pyarrow as pa

    from embedjob import report
    from embedjob.layout import job_manifest_uri, shard_outputs
    from embedjob.storage import Storage

    out = tmp_path / "out"
    shutil.copytree(scored_output["output"], out)
    uri = str(out)
    outputs = {stem: shard_outputs(uri, stem) for stem in ("00000", "00001", "00002", "00003")}
    rows = {stem: pq.read_metadata(o.metadata).num_rows for stem, o in outputs.items()}
    (out / "_job.json").write_bytes(b"[" * 200_000)
    assert job_manifest_uri(uri) == str(out / "_job.json")
    with open(outputs["00000"].manifest, "wb") as f:
        f.write(b"[1, 2]")
    manifest = json.loads(open(outputs["00001"].manifest).read())
    with open(outputs["00001"].manifest, "w") as f:
        json.dump({**manifest, "model": {**manifest["model"], "id": "x" * 3_000_000}}, f)
    table = pq.read_table(outputs["00002"].metadata)
    pq.write_table(pa.concat_tables([table] * 20), outputs["00002"].metadata)  # 120 rows: over the cap of 60
    monkeypatch.setattr(report, "MAX_METADATA_ROWS", 60)
    with open(outputs["00003"].metadata, "wb") as f:
        f.write(b"PAR1 not parquet PAR1")

    data = report.collect(uri, Storage())
    assert data["totals"]["shardsDone"] == 20
    assert data["totals"]["images"] == scored_output["images"] - rows["00000"] - rows["00001"]
    assert data["model"] == report.model_provenance([manifest["model"]]) and data["job"] is None
    kept = scored_output["images"] - sum(rows.values())
    assert all(d.count == kept for d in data["scores"].values())
    page = report.build_report(uri, Storage())
    assert "x" * 1000 not in page and len(page) < 2_000_000


def test_thumbnails_read_a_hostile_input_in_bounded_memory(tmp_path, monkeypatch):
    """The report runs on a shared worker and reads the job owner's input shards for thumbnails: a 32 MiB
    GNU long name before the wanted member is skipped unread (tarfile alone reads it whole), as the
    worker's tar reader skips it; a member over the size cap is not read."""
    import tarfile
    import tracemalloc

    from embedjob import report
    from embedjob.storage import Storage
    from tests.shards import encode, rgb

    jpeg = encode(rgb(64, 48, 1), "JPEG")
    shard = tmp_path / "hostile.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("x" * (32 << 20) + ".jpg", b"\xff"), ("0001.jpg", jpeg), ("0002.jpg", jpeg * 4)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(report, "MAX_MEMBER_BYTES", 2 * len(jpeg))
    tracemalloc.start()
    try:
        found = report.read_members(Storage(), {str(shard): {"0001.jpg", "0002.jpg"}})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == {(str(shard), "0001.jpg"): jpeg}  # 0002.jpg is over the (lowered) member cap
    assert peak < 24 << 20, peak  # the 32 MiB name was never held (skipped in 4 MiB chunks)
