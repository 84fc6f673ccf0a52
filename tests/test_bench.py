"""`embedjob bench` at a tiny size: the four measurements, their limits and ratios, and the outputs
the end-to-end run really wrote (through the Celery task body, against a real Redis)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess

import numpy as np
import pytest

from embedjob.bench.measure import vision_flops_per_image
from embedjob.bench.synth import SIZES, synthetic_jpegs
from embedjob.dev.services import embedjob_command


def _bench(tmp_path, *args: str, env: dict | None = None) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        embedjob_command("bench", "--device", "cpu", "--model-seconds", "0.2",
                         "--workdir", str(tmp_path / "work"), "--json", str(out), *args),
        capture_output=True, text=True, timeout=420, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_measures_all_four_and_the_ratios(tmp_path):
    report, stdout = _bench(tmp_path, "--size", "mix", "--count", "2", "--images-per-shard", "6",
                            "--baseline-images", "8", "--preprocessing", "both", "--deviation-model", "same",
                            "--deviation-images", "5")
    m = report["measurements"]
    assert set(m) == {"decode_limit_exact", "decode_limit_fast", "model_limit", "baseline", "e2e_exact", "e2e_fast"}
    for key in ("decode_limit_exact", "decode_limit_fast", "e2e_exact", "e2e_fast"):
        assert m[key]["images"] == 12 and m[key]["images_per_s"] > 0, key
        assert m[key]["peak_pss_mib"] > 0 and m[key]["cpu_seconds"] > 0, key
    assert m["baseline"]["images"] == 8 and m["baseline"]["processor"].startswith("CLIPImageProcessor")
    assert m["model_limit"]["images"] >= 3 * 32 and m["model_limit"]["precision"] == "fp32"

    for mode in ("exact", "fast"):
        decode, model = m[f"decode_limit_{mode}"]["images_per_s"], m["model_limit"]["images_per_s"]
        limit = report["limits"][mode]
        assert limit["rule"] == "1/(1/decode + 1/model)"  # CPU: decode and model share the cores
        assert limit["images_per_s"] == pytest.approx(1 / (1 / decode + 1 / model), rel=1e-3)
        ratios = report["ratios"][mode]
        e2e = m[f"e2e_{mode}"]["images_per_s"]
        assert ratios["e2e_over_limit"] == pytest.approx(e2e / limit["images_per_s"], rel=1e-2)
        assert ratios["e2e_over_baseline"] == pytest.approx(e2e / m["baseline"]["images_per_s"], rel=1e-2)
    for label in ("decode limit", "model limit", "baseline", "embedjob e2e", "e2e/limit", "e2e/baseline"):
        assert label in stdout
    assert report["environment"]["load_average_start"] and report["environment"]["cpus_available"] >= 1
    for mode in ("exact", "fast"):  # what a user pays: start-up apart, and the task process's own CPU
        e2e = m[f"e2e_{mode}"]
        assert 0 < e2e["startup_seconds"] < e2e["seconds"] and e2e["processes"] == 1
        assert 0 < e2e["main_cpu_ms_per_image"] <= e2e["cpu_ms_per_image"]
        # Which of the worker's threads paid for it: the data path's own threads are named.
        by_thread = e2e["main_cpu_seconds_by_thread"]
        assert "embedjob-forward" in by_thread and "embedjob-tar-reader" in by_thread, by_thread
        assert 0 < sum(by_thread.values()) <= e2e["main_cpu_seconds"] + 0.5  # the monitor's own thread left out
    assert "start-up" in stdout and "main ms/img" in stdout and "main process CPU by thread" in stdout

    # The e2e run wrote real outputs, and each manifest says how its pixels were made.
    work = tmp_path / "work"
    for mode, preprocessing in (("exact", "openai-clip-reference-v1"), ("fast", "embedjob-fast-v1")):
        manifests = [json.loads((work / f"out-{mode}" / "_manifests" / f"{i:05d}.json").read_text()) for i in (0, 1)]
        assert all(x["preprocessing"] == preprocessing for x in manifests)
        assert sum(x["counts"]["embedded"] for x in manifests) == 12
        paths: dict[str, int] = {}
        for x in manifests:
            for k, v in x["preprocessing_paths"].items():
                paths[k] = paths.get(k, 0) + v
        if mode == "exact":
            assert paths == {"exact": 12}
        else:  # the 1200x900 JPEGs of the mix are decoded at half scale, the small ones exactly
            assert paths["cpu-draft"] > 0 and paths["exact"] > 0
        assert np.load(work / f"out-{mode}" / "img_emb" / "00000.npy").shape == (6, 32)

    d = report["deviation"]
    assert d["images"] == 5 and d["identical_crops"] == 4  # only the 1 MP image is drafted
    assert d["psnr_db_min"] >= 30 and 0 < d["mean_abs_diff_max"] < 5
    assert d["cosine_min"] > 0.99


def test_bench_e2e_in_two_worker_processes(tmp_path):
    """--processes-per-gpu 2: two worker processes share the shards (and the decode CPUs); each shard
    is embedded and committed once; the CPU per image is that of the two task processes."""
    report, stdout = _bench(tmp_path, "--measure", "e2e", "--size", "256", "--count", "3",
                            "--images-per-shard", "4", "--processes-per-gpu", "2", "--decode-workers", "2")
    assert set(report["measurements"]) == {"e2e_exact"} and "limits" not in report
    e2e = report["measurements"]["e2e_exact"]
    assert e2e["processes"] == 2 and e2e["decode_workers"] == 1 and e2e["images"] == 12
    assert len(e2e["main_cpu_seconds_per_process"]) == 2
    assert e2e["main_cpu_seconds"] == pytest.approx(sum(e2e["main_cpu_seconds_per_process"]), abs=2e-3)
    assert "embedjob-forward" in e2e["main_cpu_seconds_by_thread"]  # summed over the two processes
    manifests = [json.loads((tmp_path / "work" / "out-exact" / "_manifests" / f"{i:05d}.json").read_text())
                 for i in range(3)]
    assert [x["counts"]["embedded"] for x in manifests] == [4, 4, 4]
    assert "2 processes x ShardRunner.run" in stdout


def test_bench_profile_writes_the_operators_the_e2e_spent_its_time_on(tmp_path):
    """--profile: one more e2e under torch.profiler, its tables in a file (on the CPU: by self CPU
    time; on CUDA also by device time), the measured rows untouched by the profiler's cost."""
    report, _ = _bench(tmp_path, "--measure", "e2e", "--size", "256", "--count", "3", "--images-per-shard", "4",
                       "--profile", str(tmp_path / "prof"))
    profile = report["profiles"]["exact"]
    assert profile["images"] == 8 and profile["device_busy_fraction"] is None  # the first 2 shards, on the CPU
    text = (tmp_path / "prof" / "profile-exact.txt").read_text()
    assert "by self CPU time (8 images" in text and "Self CPU" in text and "aten::" in text
    assert report["measurements"]["e2e_exact"]["images"] == 12


def test_bench_outputs_image_and_text_reports_the_text_cost(tmp_path):
    """--outputs image,text: e2e image-only and image+text on the same shards and model (500x375 on the
    CPU), the text cost per image, and the text outputs the second run really wrote."""
    report, stdout = _bench(tmp_path, "--measure", "e2e", "--size", "500x375", "--count", "1",
                            "--images-per-shard", "8", "--outputs", "image,text")
    m = report["measurements"]
    assert set(m) == {"e2e_exact", "e2e_exact_text"} and m["e2e_exact_text"]["images"] == 8
    t = report["text"]["exact"]
    assert t["image_only_images_per_s"] == m["e2e_exact"]["images_per_s"]
    assert t["image_text_images_per_s"] == m["e2e_exact_text"]["images_per_s"]
    assert t["text_tower_ms_per_image"] > 0 and t["text_stage_ms_per_image"] >= t["text_tower_ms_per_image"]
    assert "outputs image+text" in stdout and "text (exact): image only" in stdout
    work = tmp_path / "work"
    assert np.load(work / "out-exact-text" / "text_emb" / "00000.npy").shape == (8, 32)
    assert not (work / "out-exact" / "text_emb").exists()


def test_limit_rule_and_timeline():
    from embedjob.bench.e2e import timeline
    from embedjob.bench.measure import limit_of

    model = {"images_per_s": 300.0}
    exact = limit_of({"images_per_s": 200.0, "shares_model_device": False}, model, "cuda")
    assert exact == {"images_per_s": 200.0, "rule": "min(decode, model)", "shares": None}
    fast = limit_of({"images_per_s": 200.0, "shares_model_device": True}, model, "cuda")
    assert fast["rule"] == "1/(1/decode + 1/model)" and fast["shares"] == "the device's SMs"
    assert fast["images_per_s"] == pytest.approx(120.0)
    assert limit_of({"images_per_s": 200.0}, model, "cpu")["shares"] == "the CPU cores"
    # Two processes: start-up to the first batch anywhere, steady from when both write to the last write.
    t = timeline(100.0, [[(102.0, 10), (103.0, 10), (105.0, 10)], [(104.0, 10), (105.0, 10)]])
    assert t["startup_seconds"] == 2.0 and t["all_started_seconds"] == 4.0
    assert t["steady_images"] == 20 and t["steady_images_per_s"] == 20.0


def test_bench_on_s3(tmp_path, s3_env):
    env = {**os.environ, **s3_env}
    report, _ = _bench(tmp_path, "--size", "256", "--count", "1", "--images-per-shard", "4", "--baseline-images", "4",
                       "--s3-endpoint", s3_env["AWS_ENDPOINT_URL"], "--s3-bucket", "bench-test", env=env)
    assert report["environment"]["storage"] == "s3"
    assert report["measurements"]["e2e_exact"]["images"] == 4
    assert "deviation" not in report  # exact only


def test_synthetic_images_have_the_asked_sizes_and_are_distinct():
    from PIL import Image

    jpegs = synthetic_jpegs("mix", 5)
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs]
    assert sizes == list(SIZES["mix"])
    assert len(set(jpegs)) == 5


def test_vit_l14_flops_match_the_published_figure():
    from transformers import CLIPVisionConfig

    from embedjob.worker.model.random_weights import VIT_L14_VISION

    config = CLIPVisionConfig(**VIT_L14_VISION)
    config.projection_dim = 768
    assert math.isclose(vision_flops_per_image(config) / 1e9, 162, rel_tol=0.01)


def test_a_ratio_above_the_limit_or_below_the_baseline_is_never_printed_bare():
    """The report's ratios as the issue saw them on the CPU with ViT-L/14 (e2e/limit 1.082,
    e2e/baseline 0.86): each comes with why, and the steady state against the baseline."""
    from embedjob.bench.measure import limits_and_ratios
    from embedjob.bench.report import format_report

    m = {"model_limit": {"images_per_s": 5.0, "cpu_ms_per_image": 380.0},
         "decode_limit_exact": {"images_per_s": 150.0, "cpu_ms_per_image": 12.0},
         "baseline": {"images_per_s": 4.6, "processor": "CLIPImageProcessorPil"},
         "e2e_exact": {"images_per_s": 0.86 * 4.6, "steady_images_per_s": 4.9, "startup_seconds": 21.5,
                       "cpu_ms_per_image": 400.0}}
    limits, ratios = limits_and_ratios(m, ("exact",), "cpu")
    r = ratios["exact"]
    assert r["e2e_over_baseline"] == pytest.approx(0.86)
    assert r["steady_over_baseline"] == pytest.approx(4.9 / 4.6, 1e-3)
    assert any("cold start" in w and "21.5 s" in w and "steady state e2e is 1.065x" in w for w in r["why"])
    assert not any("its limit" in w for w in r["why"])  # 0.82 of the limit: nothing to explain
    m["model_limit"]["images_per_s"] = 3.6  # now e2e is above its limit
    _, ratios = limits_and_ratios(m, ("exact",), "cpu")
    assert ratios["exact"]["e2e_over_limit"] > 1 and any("measured apart" in w for w in ratios["exact"]["why"])
    report = {"config": {"preprocessing": ["exact"], "batch_size": 32, "model": "vit-l14", "count": 2,
                         "images_per_shard": 8, "size": "500x375"},
              "environment": {"device": "cpu", "device_name": "cpu", "storage": "local", "cpus_available": 2,
                              "torch_threads": 2, "load_average_start": 1.0},
              "measurements": m, "limits": limits, "ratios": ratios}
    for r in m.values():  # the columns every measured row prints
        for k, v in {"images": 16, "seconds": 4.0, "peak_pss_mib": 900.0, "cpu_cores_busy": 1.9,
                     "cpu_ms_per_image": 400.0}.items():
            r.setdefault(k, v)
    text = format_report(report)
    assert "why: e2e is 0.860x the baseline" in text and "steady/baseline 1.065" in text
    assert "x its limit: the decode and model limits are measured apart" in text
