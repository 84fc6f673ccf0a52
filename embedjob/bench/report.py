"""The benchmark's report: the human-readable table, the JSON file, and the Markdown tables that
gpu-check and a closing note show."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedjob.bench.measure import BASELINE_BATCH


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table."""
    cfg, env, m = report["config"], report["environment"], report["measurements"]
    model = m.get("model_limit", {})
    trials = model.get("batch_size_trials") or "CPU default"
    tuned = "" if cfg["batch_size"] else f" (tuned: {trials})"
    lines = [
        f"embedjob bench: model {cfg['model']} (random weights), {env['device']} ({env['device_name']}), "
        f"precision {model.get('precision')}, batch {model.get('batch_size')}{tuned}"
        f", compile {cfg.get('compile', 'none')}, processes per GPU {cfg.get('processes_per_gpu', 1)}",
        f"  shards: {cfg['count']} x {cfg['images_per_shard']} JPEGs ({cfg['size']}), {env['storage']} storage; "
        f"CPUs available {env['cpus_available']}, torch threads {env['torch_threads']}",
        f"  load average: start {env['load_average_start']}, end {env.get('load_average_end')}",
        "",
        f"  {'measurement':<48}{'images':>8}{'seconds':>9}{'images/s':>10}{'peak MiB':>10}{'CPU busy':>10}"
        f"{'CPU ms/img':>11}{'main ms/img':>12}",
    ]

    def row(label: str, r: dict[str, Any] | None) -> None:
        if r is None:
            return
        if "skipped" in r:
            lines.append(f"  {label:<48}skipped: {r['skipped']}")
            return
        lines.append(f"  {label:<48}{r['images']:>8}{r['seconds']:>9.2f}{r['images_per_s']:>10.1f}"
                     f"{r['peak_pss_mib']:>10.0f}{r['cpu_cores_busy']:>10.2f}{_fmt(r['cpu_ms_per_image']):>11}"
                     f"{_fmt(r.get('main_cpu_ms_per_image'), '.3f'):>12}")

    modes = [x for x in cfg["preprocessing"] if f"decode_limit_{x}" in m or f"e2e_{x}" in m]
    for mode in modes:
        d = m.get(f"decode_limit_{mode}")
        if d and "workers" in d:
            where = " + nvJPEG" if d.get("on_device") else ""
            row(f"1. decode limit ({mode}, {d['workers']} {d['pool']} workers{where})", d)
    if model:
        row(f"2. model limit (uint8 batches of {model.get('batch_size')}, compile {model.get('compile', 'none')})",
            model)
    if "baseline" in m:
        row(f"3. baseline ({m['baseline'].get('processor')}, fp32, b{BASELINE_BATCH})", m["baseline"])
    for mode in modes:
        e2e = m.get(f"e2e_{mode}")
        if e2e is not None:
            procs = e2e.get("processes", 1)
            who = f"{procs} processes x " if procs > 1 else ""
            row(f"4. embedjob e2e ({mode}, {who}ShardRunner.run x{e2e.get('shards_in_flight', 1)})", e2e)
        e2e_text = m.get(f"e2e_{mode}_text")
        if e2e_text is not None:
            row(f"5. embedjob e2e ({mode}, outputs image+text)", e2e_text)
    for mode in modes:
        e2e = m.get(f"e2e_{mode}") or {}
        if "startup_seconds" in e2e:
            lines.append(f"  e2e {mode}: start-up {_fmt(e2e['startup_seconds'])} s (to the first batch written), "
                         f"steady {_fmt(e2e.get('steady_images_per_s'), '.1f')} images/s "
                         f"over {_fmt(e2e.get('steady_seconds'))} s; main process CPU "
                         f"{_fmt(e2e.get('main_cpu_ms_per_image'), '.3f')} ms/image")
        if e2e.get("main_cpu_seconds_by_thread") and e2e.get("images"):
            top = sorted(e2e["main_cpu_seconds_by_thread"].items(), key=lambda kv: -kv[1])[:6]
            lines.append(f"  e2e {mode}: main process CPU by thread (ms/image): "
                         + ", ".join(f"{name} {1000 * sec / e2e['images']:.3f}" for name, sec in top))
        if e2e.get("gpu_memory_mib") is not None or e2e.get("gpu_memory_mib_per_process"):
            lines.append(f"  e2e {mode}: GPU memory reserved (peak, MiB): "
                         f"{e2e.get('gpu_memory_mib') or e2e.get('gpu_memory_mib_per_process')}")
    if model and cfg.get("compile", "none") != "none":
        lines.append(f"  compile warm-up ({cfg['compile']}): {model.get('compile_warmup_seconds')} s before the model "
                     "limit (not in it); e2e includes its own: "
                     + ", ".join(f"{x} {m[f'e2e_{x}'].get('compile_warmup_seconds')} s" for x in modes
                                 if f"e2e_{x}" in m))
    lines.append("")
    for mode, lim in report.get("limits", {}).items():
        r = report.get("ratios", {}).get(mode)
        ratio = "e2e skipped"
        if r:
            ratio = (f"e2e/limit {_fmt(r['e2e_over_limit'], '.3f')}   steady/limit "
                     f"{_fmt(r.get('steady_over_limit'), '.3f')}   e2e/baseline {_fmt(r['e2e_over_baseline'])}")
        if r and "cpu_time_ratio" in r:
            ratio += f"   CPU time (decode+model)/e2e {r['cpu_time_ratio']:.3f}"
        if r and r.get("steady_over_baseline") is not None:
            ratio += f"   steady/baseline {r['steady_over_baseline']:.3f}"
        shares = f", decode shares {lim['shares']}" if lim.get("shares") else ""
        lines.append(f"  {mode}: limit {lim['images_per_s']:.1f} images/s ({lim['rule']}{shares});  {ratio}")
        for why in (r or {}).get("why", []):
            lines.append(f"    why: {why}")
    c = report.get("compute")
    if c:
        lines.append(f"  model: {c['gflop_per_image']} GFLOP/image, {c['model_tflops']} TFLOP/s achieved vs dense "
                     f"{c['matmul_dtype']} matmul {c['matmul_peak_tflops']} TFLOP/s ({c['fraction_of_peak']})")
    for mode in modes:
        busy = (m.get(f"e2e_{mode}") or {}).get("gpu_busy_fraction")
        if busy is not None:
            lines.append(f"  GPU busy during e2e ({mode}): {busy:.2f}")
    d = report.get("deviation")
    if d:
        psnr = ("identical" if d["psnr_db_min"] is None
                else f"PSNR min {d['psnr_db_min']} dB mean {d['psnr_db_mean']} dB")
        lines.append(f"  fast ({d['fast_path']}) vs exact ({d['images']} images, {d['identical_crops']} identical "
                     f"crops): {psnr}, mean |diff| {d['mean_abs_diff']} (worst image {d['mean_abs_diff_max']}), "
                     f"cosine min {d['cosine_min']} mean {d['cosine_mean']} on {d['model']} {d['precision']}")
    scaling = report.get("decode_scaling")
    if scaling:
        lines.append("  decode scaling (exact): " + ", ".join(
            f"{x['workers']} workers {x['images_per_s']:.0f}/s" for x in scaling))
    for mode, t in (report.get("text") or {}).items():
        lines.append(f"  text ({mode}): image only {t['image_only_images_per_s']:.1f} images/s, image+text "
                     f"{t['image_text_images_per_s']:.1f} images/s (x{t['slowdown']} the time); text costs "
                     f"{t['text_ms_per_image']} ms/image end to end, the text tower "
                     f"{t['text_tower_ms_per_image']} ms/image, the text stage (tokenizing, waiting for the "
                     f"device, tower) "
                     f"{t['text_stage_ms_per_image']} ms/image")
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    lines.append(f"  peak RSS of the bench process: {env.get('peak_rss_mib_main')} MiB")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False))


def summary_markdown(reports: list[dict[str, Any]]) -> str:
    """One Markdown table over several reports (sizes, paths): what the README and a closing note show."""
    head = ("| size | path | decode limit | model limit | limit (rule) | embedjob e2e | start-up s | steady e2e "
            "| steady/limit | main CPU ms/img | baseline | e2e/baseline | GPU busy | model TFLOP/s (of peak) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        m, cfg = r["measurements"], r["config"]
        c = r.get("compute") or {}
        for mode, lim in r["limits"].items():
            e2e, ratio = m.get(f"e2e_{mode}", {}), r["ratios"].get(mode, {})
            busy = e2e.get("gpu_busy_fraction")
            rule = "min" if lim["rule"].startswith("min") else "harmonic"
            lines.append(
                f"| {cfg['size']} | {mode} | {m[f'decode_limit_{mode}']['images_per_s']:.0f} "
                f"| {m['model_limit']['images_per_s']:.0f} | {lim['images_per_s']:.0f} ({rule}) "
                f"| {e2e.get('images_per_s', 0):.0f} | {_fmt(e2e.get('startup_seconds'), '.1f')} "
                f"| {_fmt(e2e.get('steady_images_per_s'), '.0f')} | {_fmt(ratio.get('steady_over_limit'), '.3f')} "
                f"| {_fmt(e2e.get('main_cpu_ms_per_image'), '.3f')} "
                f"| {m['baseline'].get('images_per_s', 0):.1f} | {ratio.get('e2e_over_baseline')} "
                f"| {'' if busy is None else busy} "
                f"| {c.get('model_tflops', '')} ({c.get('fraction_of_peak', '')}) |")
    return "\n".join(lines)


def compile_markdown(reports: list[dict[str, Any]]) -> str:
    """The model limit per compile mode (reports of ``--measure model_limit`` runs)."""
    lines = ["| compile | model limit img/s | batch | compile warm-up s | precision |", "|---|---|---|---|---|"]
    for r in reports:
        ml = r["measurements"]["model_limit"]
        lines.append(f"| {r['config']['compile']} | {ml['images_per_s']:.0f} | {ml['batch_size']} "
                     f"| {ml.get('compile_warmup_seconds')} | {ml.get('precision')} |")
    return "\n".join(lines)
