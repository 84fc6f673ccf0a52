"""`embedjob filter`: the --where parser (no eval) and the kept keys of a real scored output."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.dev.services import embedjob_command
from embedjob.where import WhereError, evaluate, parse_where, select_keys


@pytest.mark.parametrize(
    "expr, message",
    [
        ("", "empty"),
        ("aesthetic >=", "ends too early"),
        ("aesthetic 5.5", "expected a comparison"),
        ("aesthetic >= 5.5 nsfw < 0.1", "unexpected 'nsfw' at position 18"),
        ("(aesthetic >= 5.5", "missing ')'"),
        ("__import__('os').system('true')", "unexpected character '.' at position 17"),
        ("aesthetic >= 5.5; nsfw", "unexpected character ';'"),
        ("1 < 2", "compares two constants"),
        ("aesthetic >= 5.5 and", "ends too early"),
        ("aesthetic >= and nsfw < 1", "expected a column, a number or a quoted string"),
        # Hostile sizes: a clear error, not a RecursionError or a long parse.
        ("(" * 5000 + "aesthetic > 1" + ")" * 5000, "at most 10000"),
        ("(" * 65 + "aesthetic > 1" + ")" * 65, "more than 64 nested '(' or 'not' at position 65"),
        ("not " * 100 + "aesthetic > 1", "more than 64 nested '(' or 'not'"),
    ],
)
def test_malformed_expressions_get_a_clear_error(expr, message):
    with pytest.raises(WhereError, match=re.escape(message)):
        parse_where(expr)


def test_evaluate_precedence_nulls_and_strings():
    t = pa.table({"a": [1.0, float("nan"), 3.0, 6.0], "b": [0.0, 0.0, 1.0, None], "k": ["x", "y", "z", "w"]})
    # "and" binds tighter than "or"; a comparison with a missing value (NaN, null) is false
    assert evaluate(parse_where("a > 2 or b == 0 and k == 'x'"), t).tolist() == [True, False, True, True]
    assert evaluate(parse_where("(a > 2 or b == 0) and k == 'x'"), t).tolist() == [True, False, False, False]
    assert evaluate(parse_where("a >= 1 AND NOT a > 3"), t).tolist() == [True, False, True, False]
    assert evaluate(parse_where('k = "y"'), t).tolist() == [False, True, False, False]
    assert evaluate(parse_where("2 < a"), t).tolist() == [False, False, True, True]
    with pytest.raises(WhereError, match="one is a number, the other text"):
        evaluate(parse_where("k > 1"), t)


def test_filter_returns_exactly_the_expected_keys(scored_output):
    out = str(scored_output["output"])
    metas = sorted((scored_output["output"] / "metadata").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in metas])
    aesthetic, nsfw = table.column("aesthetic").to_numpy(), table.column("nsfw").to_numpy()
    # thresholds that split the random scores somewhere in the middle
    a_cut, n_cut = float(np.median(aesthetic)), float(np.quantile(nsfw, 0.7))
    expected = [k for k, a, n in zip(table.column("key").to_pylist(), aesthetic, nsfw, strict=True)
                if a >= np.float32(a_cut) and n < np.float32(n_cut)]
    assert 0 < len(expected) < table.num_rows
    kept = select_keys(out, f"aesthetic >= {a_cut!r} and nsfw < {n_cut!r}")
    assert kept.column("key").to_pylist() == expected
    # row: the row of the shard's .npy, so the embeddings of the kept keys can be read directly
    first = kept.slice(0, 1).to_pylist()[0]
    meta = pq.read_table(scored_output["output"] / "metadata" / f"{first['stem']}.parquet")
    assert meta.column("key")[first["row"]].as_py() == first["key"]
    with pytest.raises(WhereError, match="no column 'sharpness'"):
        select_keys(out, "sharpness > 1")


def test_filter_cli_writes_keys_and_refuses_a_malformed_expression(scored_output, tmp_path):
    out = str(scored_output["output"])
    keys = tmp_path / "keys.parquet"
    cmd = embedjob_command("filter", out)
    r = subprocess.run([*cmd, "--where", "nsfw >= 0", "--keys", str(keys)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    written = pq.read_table(keys)
    assert written.num_rows == scored_output["images"] and written.column_names == ["key", "shard", "member",
                                                                                     "stem", "row"]
    r = subprocess.run([*cmd, "--where", "aesthetic >= 5.5 nsfw < 0.1", "--keys", str(tmp_path / "no.parquet")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and not (tmp_path / "no.parquet").exists()
    assert "error: --where: unexpected 'nsfw' at position 18" in r.stderr


def test_job_manifest_scores_merge_the_shards_sketches(scored_output):
    """_job.json's summaries come from the manifests' sketches; they agree with the columns."""
    out = scored_output["output"]
    job = json.loads((out / "_job.json").read_text())
    assert job["totals"]["images"] == scored_output["images"] and job["totals"]["failedImages"] == 1
    for score in ("aesthetic", "nsfw"):
        values = np.sort(np.concatenate([pq.read_table(p).column(score).to_numpy()
                                         for p in sorted((out / "metadata").glob("*.parquet"))]).astype(np.float64))
        s = job["scores"][score]
        assert s["count"] == values.size and s["mean"] == pytest.approx(values.mean(), abs=1e-6)
        for name, q in (("p1", 0.01), ("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            rank = np.searchsorted(values, s[name], side="right") / values.size
            assert abs(rank - q) <= 0.01 + 1 / values.size, (score, name)
    manifest = json.loads(next((out / "_manifests").glob("*.json")).read_text())
    assert set(manifest["scores"]) == {"aesthetic", "nsfw"} and "sha256" in manifest["scores"]["nsfw"]


def test_filter_writes_nothing_when_a_later_shard_lacks_the_column(scored_output, tmp_path):
    """The keys are written shard by shard (memory holds a few shards, not the output's keys), and the
    file appears only complete: a shard past the first ones without the column fails the command with
    nothing written, no temporary file left beside it either."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(scored_output["output"], out)
    meta = out / "metadata" / "00017.parquet"
    pq.write_table(pq.read_table(meta).drop_columns(["nsfw"]), meta)
    folder = tmp_path / "keys"
    folder.mkdir()
    r = subprocess.run([*embedjob_command("filter", str(out)), "--where", "nsfw >= 0", "--keys",
                        str(folder / "keys.parquet")], capture_output=True, text=True)
    assert r.returncode == 2 and "no column 'nsfw' in 00017's metadata" in r.stderr
    assert list(folder.iterdir()) == []


def test_report_and_filter_refuse_an_output_of_more_shard_manifests_than_a_job_plans(scored_output, tmp_path):
    """The output prefix is the job owner's to write, and the report runs on a shared worker: its listing
    of the manifests stops past EMBEDJOB_MAX_SHARDS (the most one job plans) with a clear error, instead
    of holding however many stems someone planted there; nothing is written."""
    env = {**os.environ, "EMBEDJOB_MAX_SHARDS": "19"}  # the output holds 20
    html, keys = tmp_path / "report.html", tmp_path / "keys.parquet"
    for args in (("report", str(scored_output["output"]), "--html", str(html)),
                 ("filter", str(scored_output["output"]), "--where", "nsfw >= 0", "--keys", str(keys))):
        r = subprocess.run(embedjob_command(*args), capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2, (args[0], r.returncode, r.stderr)
        assert "more than 19 shard manifests under" in r.stderr and "EMBEDJOB_MAX_SHARDS" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []
    env["EMBEDJOB_MAX_SHARDS"] = "20"
    r = subprocess.run(embedjob_command("filter", str(scored_output["output"]), "--where", "nsfw >= 0", "--keys",
                                        str(keys)), capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and pq.read_table(keys).num_rows > 0, r.stderr
