"""Budget reports: from a real fit, from hand-written ledgers with known totals, and from bad ones."""

import json
import os
import re
import shutil
import stat
import subprocess
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import make_clocked_model, make_crashing_model
from costaware.ledger import LedgerError, read_ledger
from costaware.report import build_report, find_ledger, publish_to_loggers, render_html, render_markdown, write_report
from costaware.report import text as T
from costaware.report.write import atomic_write

# ------------------------------------------------------------------------------------------------
# Hand-written ledgers (also used by test_cli.py)
# ------------------------------------------------------------------------------------------------

GPU_METERS = {"gpu": {"present": True, "name": "NVIDIA H100 80GB HBM3", "status": "ok",
                      "energy_source": "nvml energy counter", "disabled_fields": []},
              "host": {"present": True, "status": "ok", "method": "RAPL counters (codecarbon)"},
              "flops": {"source": "FlopCounterMode on real batches", "status": "ok"}}
CPU_METERS = {"gpu": {"present": False, "name": None, "status": "no GPU on this rank", "energy_source": "unavailable",
                      "disabled_fields": ["energy", "power", "utilization", "memory"]},
              "host": {"present": False, "status": "host counted by local rank 0",
                       "method": "not metered on this rank"},
              "flops": {"source": "FlopCounterMode on real batches", "status": "ok"}}
PRICES = {"mode": "cloud", "gpu_model": "H100-SXM", "usd_per_gpu_hour": 3.0,
          "usd_per_gpu_hour_source": "given by the user", "usd_per_host_hour": 0.5, "usd_per_kwh": 0.0, "pue": 1.1,
          "g_co2_per_kwh": 400.0, "carbon_source": "given by the user"}


def totals_at(elapsed_s, batches_per_s=0.1, gpus=1):
    """Totals of a run priced at $3/GPU-h + $0.5/host-h, 500 W GPU, 100 W CPU, 10 W RAM, after ``elapsed_s``."""
    hours = elapsed_s / 3600.0
    t = {"elapsed_s": elapsed_s, "gpu_hours": hours * gpus, "host_hours": hours,
         "gpu_energy_j": 500.0 * elapsed_s * gpus, "cpu_energy_j": 100.0 * elapsed_s, "ram_energy_j": 10.0 * elapsed_s,
         "flops": 1e12 * elapsed_s,
         "usd": 3.0 * hours * gpus + 0.5 * hours, "train_batches": batches_per_s * elapsed_s}
    t["kwh"] = (t["gpu_energy_j"] + t["cpu_energy_j"] + t["ram_energy_j"]) / 3.6e6
    t["co2_kg"] = t["kwh"] * 1.1 * 0.4
    return t


def make_records(samples=10, step_s=360.0, metrics=("val_acc",), meters=GPU_METERS, end=True, max_steps=None,
                 run_id="run-a", schema=1, events=(), accuracy=lambda i: 0.5 + 0.04 * i):
    """Records of a run sampled every ``step_s``, one metric point per sample; returns (records, end totals)."""
    records = [{"kind": "header", "schema": schema, "run_id": run_id, "wall_time": 1.75e9, "prices": PRICES,
                "meters": meters, "world_size": 1, "num_nodes": 1, "precision": "bf16-mixed",
                "peak_flops_per_s": 989e12 if meters is GPU_METERS else None, "max_steps": max_steps,
                "max_epochs": None if max_steps else 3, "resumed_from": None}]
    t = totals_at(0.0)
    for i in range(1, samples + 1):
        t = totals_at(i * step_s)
        sample = {"kind": "sample", "wall_time": 1.75e9 + i * step_s, "totals": t,
                  "throughput_batches_per_s": 0.1, "throughput_flops_per_s": 1e12}
        if meters is GPU_METERS:
            sample.update(gpu_power_w=100.0 * i, gpu_utilization_pct=50.0 + i, throughput_mfu_pct=0.1,
                          gpu_memory_used_gib=10.0, host_cpu_power_w=100.0)
        records.append(sample)
        for name in metrics:
            records.append({"kind": "metric", "name": name, "value": accuracy(i), "step": i * 36,
                            "usd": t["usd"], "elapsed_s": t["elapsed_s"], "wall_time": 1.75e9 + i * step_s})
    for event in events:
        records.append({"kind": "event", "wall_time": 1.75e9 + samples * step_s, "totals": t, **event})
    if end:
        records.append({"kind": "end", "wall_time": 1.75e9 + samples * step_s + 1, "totals": t, "how": "completed",
                        "meters": meters})
    return records, t


def write_ledger(folder, records, lines=None):
    """Write records as ``folder/costaware/ledger.jsonl``; returns the ledger path."""
    path = Path(folder) / "costaware" / "ledger.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [json.dumps(r) for r in records] if lines is None else lines
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def killed_ledger(folder):
    """A run killed mid-write: no end record, and the last line cut in half."""
    records, _ = make_records(end=False)
    lines = [json.dumps(r) for r in records]
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    path = write_ledger(folder, records, lines)
    path.write_text(path.read_text().rstrip("\n"))  # a killed writer leaves no final newline
    return path, records


# ------------------------------------------------------------------------------------------------
# A real fit
# ------------------------------------------------------------------------------------------------


def test_report_of_a_real_fit(pl_ns, tmp_path, clock):
    monitor = pl_ns.costaware.CostMonitor(usd_per_host_hour=1.0, cpu_tdp_w=10, ram_power_w=3)
    monitor.meter.clock = clock
    trainer = pl_ns.Trainer(max_steps=20, callbacks=[monitor], default_root_dir=tmp_path, log_every_n_steps=5,
                            val_check_interval=10, limit_val_batches=2, enable_progress_bar=False,
                            enable_model_summary=False)
    trainer.fit(make_clocked_model(pl_ns.BoringModel, clock, step_s=1.0))

    paths = write_report(trainer.log_dir)
    folder = Path(trainer.log_dir) / "costaware"
    assert {k: p.parent for k, p in paths.items()} == {"json": folder, "md": folder, "html": folder}
    assert sorted(p.name for p in folder.iterdir()) == ["ledger.jsonl", "report.html", "report.json", "report.md"]
    report = json.loads(paths["json"].read_text())
    ledger = read_ledger(folder)
    assert report["schema"] == 2 and report["ledger"]["complete"] and not report["problems"]
    assert report["totals"] == ledger.end["totals"]  # exactly the ledger's figures
    assert report["totals"]["usd"] == pytest.approx(20 / 3600)  # 20 steps x 1 s on the fake clock at $1/h
    assert report["energy"]["gpu"] == {"measured": False, "kwh": None, "status": "not measured: no GPU on this rank"}
    assert report["energy"]["cpu"]["measured"] and report["energy"]["cpu"]["kwh"] > 0
    assert report["outcome"]["how"] == "completed"
    assert [m["name"] for m in report["metrics"]] == ["val_loss"]
    assert report["planned"]["fraction_done"] == 1.0  # 20 of max_steps=20
    html = paths["html"].read_text()
    for chart in ("chart-cost", "chart-breakdown", "chart-energy", "chart-metric-0"):
        assert f'id="{chart}"' in html
    assert "not measured: no GPU on this rank" in html
    md = paths["md"].read_text()
    assert "## Summary" in md and "| Energy, GPU | not measured: no GPU on this rank |" in md

    done = publish_to_loggers(trainer.loggers, paths, step=trainer.global_step)
    assert done == ["TensorBoardLogger: text costaware/report"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir, size_guidance={"tensors": 0}).Reload()
    assert "costaware/report/text_summary" in events.Tags()["tensors"]


def test_report_of_a_crashed_fit(pl_ns, tmp_path, clock):
    monitor = pl_ns.costaware.CostMonitor(usd_per_host_hour=1.0, cpu_tdp_w=10, ram_power_w=3)
    monitor.meter.clock = clock
    trainer = pl_ns.Trainer(max_steps=20, callbacks=[monitor], default_root_dir=tmp_path, log_every_n_steps=2,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(make_crashing_model(pl_ns.BoringModel, clock))
    report = json.loads(write_report(trainer.log_dir)["json"].read_text())
    assert report["outcome"] == {"how": "crashed", "why": "stopped by an exception: RuntimeError: boom"}
    assert report["totals"]["train_batches"] == 6 and report["planned"]["fraction_done"] == pytest.approx(0.3)
    assert report["planned"]["usd"] == pytest.approx(report["totals"]["usd"] / 0.3)


# ------------------------------------------------------------------------------------------------
# Hand-written ledgers
# ------------------------------------------------------------------------------------------------


def test_known_totals_match_the_ledger_exactly(tmp_path):
    records, end_totals = make_records(samples=10, max_steps=1000)
    write_ledger(tmp_path, records)
    report = build_report(tmp_path)
    assert report["totals"] == end_totals
    assert report["totals_source"] == "end record"
    assert report["totals"]["usd"] == pytest.approx(3.5)  # 1 h at $3 + $0.5
    assert report["energy"]["gpu"]["kwh"] == end_totals["gpu_energy_j"] / 3.6e6
    assert report["energy"]["total_note"] == "complete"
    parts = {row["part"]: row["usd"] for row in report["cost_breakdown"]}
    assert parts == {"GPU rental": pytest.approx(3.0), "host rental": pytest.approx(0.5)}
    # Samples every 360 s with 100, 200, ... 1000 W: a time-weighted mean of 550 W.
    assert report["averages"]["gpu_power_w"] == pytest.approx(550.0)
    assert report["averages"]["gpu_utilization_pct"] == pytest.approx(55.5)
    assert report["averages"]["mfu_pct_overall"] == pytest.approx(100 * 1e12 / 989e12)
    # 360 of 1000 planned batches: the plan would have cost 3.5 / 0.36.
    assert report["planned"]["usd"] == pytest.approx(3.5 / 0.36)
    assert report["planned"]["usd_not_spent"] == pytest.approx(3.5 / 0.36 - 3.5)
    best = report["metrics"][0]
    assert (best["name"], best["best"], best["usd_at_best"]) == ("val_acc", pytest.approx(0.9), end_totals["usd"])
    assert report["series"]["cost"]["usd"][-1] == pytest.approx(3.5)
    json.dumps(report, allow_nan=False)  # plain JSON


def test_killed_run_is_reported_from_what_the_ledger_holds(tmp_path):
    _, records = killed_ledger(tmp_path)
    report = build_report(tmp_path)
    assert not report["ledger"]["complete"] and report["ledger"]["trusted"]
    assert any("truncated last line" in p for p in report["problems"])
    last_sample = [r for r in records if r["kind"] == "sample"][-1]  # the cut line was a metric record
    assert report["totals"] == last_sample["totals"]
    assert report["totals_source"].startswith("latest record")
    assert "killed" in report["outcome"]["why"]
    paths = write_report(tmp_path)
    assert "truncated last line" in paths["html"].read_text()


def test_corrupt_middle_line_is_skipped_and_listed(tmp_path):
    records, end_totals = make_records()
    lines = [json.dumps(r) for r in records]
    lines.insert(5, '{"kind": "sample", "tot')
    lines.insert(7, "\x00\x00garbage")
    write_ledger(tmp_path, records, lines)
    report = build_report(tmp_path)
    assert report["totals"] == end_totals
    assert sum("corrupt line" in p for p in report["problems"]) == 2
    html = render_html(report)
    assert 'id="problems"' in html and "ledger.jsonl:6: corrupt line" in html


def test_newer_schema_is_read_best_effort(tmp_path):
    records, end_totals = make_records(schema=99)
    write_ledger(tmp_path, records)
    with pytest.raises(LedgerError, match="newer"):
        read_ledger(tmp_path / "costaware")
    report = build_report(tmp_path)
    assert not report["ledger"]["trusted"] and report["ledger"]["schema"] == 99
    assert "newer" in report["problems"][0] and "best-effort" in report["problems"][0]
    assert report["totals"] == end_totals
    assert "best-effort" in write_report(tmp_path)["md"].read_text()


def test_non_integer_schema_is_named_and_read_best_effort(tmp_path):
    records, end_totals = make_records(schema="one")
    write_ledger(tmp_path, records)
    with pytest.raises(LedgerError, match="schema must be an integer, got 'one'"):
        read_ledger(tmp_path / "costaware")
    report = build_report(tmp_path)
    assert not report["ledger"]["trusted"] and report["totals"] == end_totals


def test_ledger_without_a_header(tmp_path):
    records, end_totals = make_records()
    write_ledger(tmp_path, records[1:])
    report = build_report(tmp_path)
    assert not report["ledger"]["trusted"] and report["totals"] == end_totals
    assert any("no header record" in p for p in report["problems"])
    assert report["prices"] is None and "unknown" in render_markdown(report)


def test_no_ledger_is_a_clear_error(tmp_path):
    with pytest.raises(LedgerError, match="no costaware ledger in"):
        build_report(tmp_path)
    with pytest.raises(LedgerError, match="does not exist"):
        build_report(tmp_path / "missing")
    (tmp_path / "ledger.jsonl").write_text("not json\n\n{}\n")
    with pytest.raises(LedgerError, match="holds no costaware record"):
        build_report(tmp_path)


def test_find_ledger_accepts_each_way_of_naming_a_run(tmp_path):
    path = write_ledger(tmp_path / "lightning_logs" / "version_0", make_records()[0])
    assert find_ledger(path) == path
    assert find_ledger(path.parent) == path
    assert find_ledger(path.parent.parent) == path
    assert find_ledger(tmp_path / "lightning_logs") == path  # the one version below
    write_ledger(tmp_path / "lightning_logs" / "version_1", make_records()[0])
    with pytest.raises(LedgerError, match="holds 2 costaware ledgers"):
        find_ledger(tmp_path / "lightning_logs")


def test_names_from_the_run_stay_text(tmp_path):
    evil = "<script>alert(1)</script>"
    records, _ = make_records(metrics=(evil, "a|b_c*"), run_id='<img src=x onerror="alert(2)">', events=[
        {"name": "</li><script>alert(3)</script>", "detail": evil},
        {"name": "strategy_result", "rows": [{evil: "<b>x</b>", "usd": 1.0}]},
        {"name": "marginal_gain_decision", "monitor": evil, "stop": True, "reason": evil, "predicted_final": 0.95,
         "usd_to_predicted_final": 1.0},
    ])
    write_ledger(tmp_path / "<b>run</b>", records)
    paths = write_report(tmp_path / "<b>run</b>")
    html = paths["html"].read_text()
    assert "<script" not in html.lower() and "<img" not in html.lower() and "<b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    tags = _tags(html)
    assert not [t for t, _ in tags if t in ("script", "img", "iframe", "object", "embed", "link", "b")]
    assert not [(t, a) for t, attrs in tags for a, _ in attrs if a in ("src", "href") or a.startswith("on")]
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    md = paths["md"].read_text()
    assert "<script" not in md and "<img" not in md and "a\\|b\\_c\\*" in md
    for svg in re.findall(r"<svg.*?</svg>", html, flags=re.S):
        ET.fromstring(svg)  # each chart is well-formed XML


def _tags(html):
    """Every (tag, attrs) a browser's parser would build from ``html``."""
    from html.parser import HTMLParser

    found = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, attrs))

    Collect().feed(html)
    return found


def test_unmeasured_meters_are_said_never_zero(tmp_path):
    records, _ = make_records(meters=CPU_METERS)
    write_ledger(tmp_path, records)
    report = build_report(tmp_path)
    for part in ("gpu", "cpu", "ram"):
        assert report["energy"][part]["kwh"] is None and report["energy"][part]["status"].startswith("not measured")
    assert report["energy"]["ram"]["status"] == "not measured: host counted by local rank 0"
    assert report["averages"]["gpu_utilization_pct"] is None
    md, html = render_markdown(report), render_html(report)
    assert "| Energy, GPU | not measured: no GPU on this rank |" in md
    assert "| Mean GPU utilization | not measured: no GPU on this rank |" in md
    assert "Energy, GPU | 0" not in md
    assert 'class="missing">not measured: no GPU on this rank</text>' in html
    assert "GPU power and utilization: not measured: no GPU on this rank" in html


def test_degraded_meter_is_partly_measured(tmp_path):
    meters = json.loads(json.dumps(GPU_METERS))
    meters["gpu"]["status"] = "degraded: NVML power query failed mid-run (Unknown Error); last readings kept"
    records, _ = make_records(meters=meters, events=[{"name": "meter_degraded", "meter": "gpu",
                                                     "status": meters["gpu"]["status"]}])
    write_ledger(tmp_path, records)
    report = build_report(tmp_path)
    assert report["energy"]["gpu"]["measured"] and report["energy"]["gpu"]["status"].startswith("partly measured")
    assert "The gpu meter degraded: degraded: NVML power query failed" in report["events"][0]["summary"]


def test_a_run_that_completed_its_epochs_saved_nothing_and_a_stale_forecast_is_left_out(tmp_path):
    # A max_epochs plan (no share of it known) that completed: its forecast's gap is no saving.
    records, t = make_records(events=[{"name": "forecast", "forecast_usd": 5.0, "basis": "early forecast"}])
    write_ledger(tmp_path, records)
    planned = build_report(tmp_path)["planned"]
    assert planned["usd"] == 5.0 and planned["usd_not_spent"] is None
    # A forecast below what was already spent (stale) is not the plan's cost.
    records, t = make_records(events=[{"name": "forecast", "forecast_usd": 0.5, "basis": "stale"}])
    write_ledger(tmp_path, records)
    assert all(e["usd"] >= t["usd"] for e in build_report(tmp_path)["planned"]["estimates"])


def test_decisions_forecasts_caps_and_strategies(tmp_path):
    curve = {"usd": [0.5, 1.0, 2.0, 4.0], "value": [0.6, 0.7, 0.8, 0.85]}
    records, _ = make_records(max_steps=1000, events=[
        {"name": "marginal_gain_decision", "monitor": "val_acc", "stop": False, "reason": "worth it",
         "predicted_final": 0.93, "usd_to_predicted_final": 2.0},
        {"name": "marginal_gain_decision", "monitor": "val_acc", "stop": True, "reason": "not worth it: next $0.5 "
         "buys 0.01 points", "predicted_final": 0.92, "usd_to_predicted_final": 1.5, "curve_points": curve,
         "curve": "power(alpha=0.5): 0.7"},
        {"name": "budget_cap_hit", "cap": "max_usd", "limit": 3.4, "value": 3.5},
        {"name": "forecast", "forecast_usd": 12.0, "basis": "policy plan"},
        {"name": "strategy_result", "rows": [
            {"model": "teacher", "val_acc": 0.9, "usd": 3.5, "params": 110e6},
            {"model": "student", "val_acc": 0.87, "usd": 0.4, "params": 22e6},
            {"model": "int8", "val_acc": 0.895, "usd": 0.05}]},
    ])
    write_ledger(tmp_path, records)
    report = build_report(tmp_path)
    summaries = [e["summary"] for e in report["events"]]
    assert summaries[1].startswith("Stop (val_acc): not worth it: next $0.5 buys 0.01 points; "
                                   "predicted final 0.92 for $1.5 more")
    assert summaries[2] == "Budget cap max_usd hit: 3.5 reached the limit 3.4"
    assert report["planned"]["usd"] == 12.0 and report["planned"]["basis"] == "forecast event (policy plan)"
    assert len(report["planned"]["estimates"]) == 3  # forecast, max_steps, marginal-gain
    assert report["outcome"]["why"].startswith("stopped by a budget cap")
    assert [r["model"] for r in report["strategy_results"]] == ["teacher", "student", "int8"]
    html = render_html(report)
    for css in ('class="forecast"', 'class="stop"', 'class="cap"', 'class="curve"'):
        assert css in html, css
    md = render_markdown(report)
    assert "## Teacher, student and quantized results" in md
    assert "| model | val\\_acc | usd | params |" in md and "| int8 | 0.895 | 0.05 |  |" in md


def test_best_metric_follows_the_declared_mode(tmp_path):
    records, _ = make_records(metrics=("score", "val_loss"), events=[
        {"name": "marginal_gain_policy", "monitor": "score", "mode": "min", "usd_per_point": 0.5,
         "strategies": ["early_stop"]}])
    write_ledger(tmp_path, records)
    report = build_report(tmp_path)
    modes = {m["name"]: (m["mode"], m["best"]) for m in report["metrics"]}
    assert modes == {"score": ("min", pytest.approx(0.54)), "val_loss": ("min", pytest.approx(0.54))}
    assert report["events"][0]["summary"] == "Marginal-gain policy on score (min): $0.5 per point; then early_stop"
    records, _ = make_records(events=[
        {"name": "marginal_gain_policy", "monitor": "val_acc", "mode": "max", "usd_per_point": 2,
         "strategies": ["early_stop"], "anneals": True, "baseline": 0.51}])
    write_ledger(tmp_path, records)
    assert build_report(tmp_path)["events"][0]["summary"] == (
        "Marginal-gain policy on val_acc (max): $2 per point; waits for learning-rate annealing; baseline 0.51; "
        "then early_stop")


def test_resumed_run_and_odd_event_fields(tmp_path):
    records, _ = make_records(events=[{"name": "custom_thing", "ratio": float("nan"), "nested": {"a": [1, 2]}}])
    records.insert(5, {**records[0], "prices": {**PRICES, "usd_per_gpu_hour": 4.0},
                       "resumed_from": {"run_id": "run-a", "checkpoint_usd": 1.0}})
    write_ledger(tmp_path, records)  # json.dumps writes the NaN as a bare NaN token
    report = build_report(tmp_path)
    summaries = {e["name"]: e["summary"] for e in report["events"]}
    assert summaries["resumed"] == "Resumed from a checkpoint of run run-a, carrying $1 already spent"
    assert summaries["custom_thing"] == 'custom_thing: ratio=NaN; nested={"a": [1, 2]}'
    assert report["run"]["resumes"] == 1 and any("prices changed on resume" in n for n in report["notes"])
    saved = json.loads(write_report(tmp_path)["json"].read_text())
    assert saved["events"][-1]["fields"] == {"ratio": None, "nested": {"a": [1, 2]}}


def _resumed(records, **changes):
    """A second header, as a restart from a checkpoint writes it."""
    return {**records[0], "wall_time": 1.76e9, "resumed_from": {"run_id": records[0]["run_id"], "checkpoint_usd": 1.0},
            **changes}


@pytest.mark.parametrize("first_session_end", [
    {"name": "exception", "error": "RuntimeError: CUDA error: an illegal memory access"},
    {"name": "budget_cap_hit", "cap": "max_usd", "limit": 1.0, "value": 1.01},
    {"name": "marginal_gain_decision", "stop": True, "reason": "not worth it"},
])
def test_outcome_is_decided_by_the_last_session_only(tmp_path, first_session_end):
    first, _ = make_records(samples=5, end=False, events=[first_session_end], max_steps=360)
    second, t = make_records(samples=10, max_steps=360)  # 360 batches: the plan is finished
    records = first + [_resumed(first)] + second[1:]
    write_ledger(tmp_path, records)
    report = build_report(tmp_path)
    assert report["run"]["resumes"] == 1 and report["planned"]["fraction_done"] == pytest.approx(1.0)
    assert report["outcome"] == {"how": "completed", "why": "completed: max_steps reached"}

    # Without a plan, a clean end is just that; and what ends the last session still counts.
    write_ledger(tmp_path, [r if r["kind"] != "header" else {**r, "max_steps": None} for r in records])
    assert build_report(tmp_path)["outcome"] == {"how": "completed", "why": "ended: completed"}
    crashed = records[:-1] + [{"kind": "event", "name": "exception", "error": "ValueError: late", "totals": t},
                              {**records[-1], "how": "exception"}]
    write_ledger(tmp_path, crashed)
    assert build_report(tmp_path)["outcome"] == {"how": "crashed", "why": "stopped by an exception: ValueError: late"}


def test_planned_run_counts_accumulated_batches(tmp_path):
    # 10 samples x 360 s x 0.1 batch/s = 360 batches done, $3.50 spent.
    records, t = make_records(max_steps=180)
    records[0]["accumulate_grad_batches"] = 4  # 180 optimizer steps x 4 = 720 batches planned
    write_ledger(tmp_path, records)
    planned = build_report(tmp_path)["planned"]
    assert planned["fraction_done"] == pytest.approx(0.5)
    assert planned["usd"] == pytest.approx(2 * t["usd"]) and planned["usd_not_spent"] == pytest.approx(t["usd"])
    assert "x 4)" in planned["basis"] and "accumulate_grad_batches" in planned["basis"]

    records[0]["max_steps"] = 90  # 90 steps x 4 = all 360 batches: finished, not "4 times over"
    write_ledger(tmp_path, records)
    report = build_report(tmp_path)
    assert report["planned"]["fraction_done"] == pytest.approx(1.0)
    assert report["outcome"]["why"] == "completed: max_steps reached"

    del records[0]["accumulate_grad_batches"]  # not recorded: one batch per step is assumed, and said
    records[0]["max_steps"] = 720
    write_ledger(tmp_path, records)
    planned = build_report(tmp_path)["planned"]
    assert planned["fraction_done"] == pytest.approx(0.5) and "assumes one batch per optimizer step" in planned["basis"]
    records[0]["max_steps"] = 90  # 4x more batches than steps, and no record of why: no estimate
    write_ledger(tmp_path, records)
    assert build_report(tmp_path)["planned"]["fraction_done"] is None


def test_missing_totals_are_not_recorded_never_zero(tmp_path):
    records, t = make_records()
    for key in ("flops", "usd", "gpu_energy_j"):
        del records[-1]["totals"][key]
    records[-1]["totals"]["train_batches"] = "many"
    del records[-1]["totals"]["kwh"]
    write_ledger(tmp_path, records)
    report = build_report(tmp_path)
    totals = report["totals"]
    assert (totals["flops"], totals["usd"], totals["gpu_energy_j"], totals["train_batches"]) == (None, None, None, None)
    assert totals["kwh"] == pytest.approx((t["cpu_energy_j"] + t["ram_energy_j"]) / 3.6e6)  # what is recorded
    assert report["flops_status"] == "not recorded: the ledger's totals hold no FLOP count"
    assert report["energy"]["gpu"] == {"measured": False, "kwh": None,
                                       "status": "not recorded: the ledger's totals hold no gpu_energy_j"}
    assert report["cost_breakdown"] == [] and report["planned"]["usd_not_spent"] is None
    md = render_markdown(report)
    assert "| Dollars | not recorded |" in md and "| Training batches | not recorded |" in md
    assert "| FLOPs | not recorded: the ledger's totals hold no FLOP count |" in md
    assert "0 FLOP" not in md and "| Dollars | $" not in md
    saved = json.loads(write_report(tmp_path)["json"].read_text())
    assert saved["totals"]["usd"] is None and "not recorded" in render_html(report)

    write_ledger(tmp_path, [r for r in records if r["kind"] == "header"])  # no totals anywhere
    report = build_report(tmp_path)
    assert set(report["totals"].values()) == {None} and report["outcome"]["why"].startswith("no end record")
    assert "| Wall time | not recorded, from 2025-06-15T" in render_markdown(report)


def test_non_numeric_prices_are_problems_not_crashes(tmp_path):
    records, _ = make_records()
    records[0]["prices"] = {**records[0]["prices"], "mode": "on_prem", "usd_per_gpu_hour": "3.0", "pue": "high",
                            "usd_per_kwh": float("nan"), "g_co2_per_kwh": None}
    write_ledger(tmp_path, records)
    report = build_report(tmp_path)
    assert report["prices"]["usd_per_gpu_hour"] is None and report["prices"]["pue"] is None
    assert report["prices"]["usd_per_kwh"] is None and report["prices"]["usd_per_host_hour"] == 0.5
    assert [p for p in report["problems"] if p.startswith("header price")] == [
        "header price usd_per_gpu_hour is not a finite number (3.0): shown as unknown",
        "header price usd_per_kwh is not a finite number (NaN): shown as unknown",
        "header price pue is not a finite number (high): shown as unknown"]
    md = render_markdown(report)
    assert "| GPU price | n/a/GPU-h, given by the user |" in md and "| PUE | n/a |" in md
    assert render_html(report).startswith("<!DOCTYPE html>")
    assert T.usd("3.0") == T.number("x") == T.si([1]) == T.duration("1") == T.percent("50") == "n/a"


def test_marginal_gain_decisions_are_thinned_to_about_fifty(tmp_path):
    for count in (53, 99, 100, 400):
        decisions = [{"name": "marginal_gain_decision", "stop": False, "monitor": "val_acc", "value": 0.5 + i * 1e-3,
                      "totals": totals_at(10.0 * (i + 1))} for i in range(count)]
        decisions[10]["stop"] = True
        write_ledger(tmp_path, make_records(events=decisions)[0])
        kept = [f for f in build_report(tmp_path)["series"]["forecasts"] if f["kind"] == "marginal_gain"]
        assert 25 <= len(kept) <= 52, (count, len(kept))  # at most 50, the stop decision and the last
        assert kept[-1]["value"] == pytest.approx(0.5 + (count - 1) * 1e-3) and any(f["stop"] for f in kept)


def test_long_run_is_downsampled_for_plots_never_for_totals(tmp_path):
    records, end_totals = make_records(samples=12_000, step_s=7.2, metrics=())
    records[5000]["gpu_power_w"] = 99_999.0  # an outlier the plot must keep
    write_ledger(tmp_path, records)
    report = build_report(tmp_path)
    assert report["totals"] == end_totals
    power = report["series"]["readings"]["gpu_power_w"]
    assert power["points_in_ledger"] == 12_000 and len(power["value"]) <= 600
    assert 99_999.0 in power["value"]  # the outlier survives downsampling
    usd = report["series"]["cost"]["usd"]
    assert len(usd) <= 600 and usd[-1] == pytest.approx(end_totals["usd"])
    paths = write_report(tmp_path)
    assert paths["html"].stat().st_size < 500_000


def test_writes_are_atomic_and_stay_in_the_run_folder(tmp_path):
    write_ledger(tmp_path / "run", make_records()[0])
    outside = tmp_path / "outside.html"
    outside.write_text("keep me")
    os.symlink(outside, tmp_path / "run" / "costaware" / "report.html")
    paths = write_report(tmp_path / "run")
    assert outside.read_text() == "keep me"  # the link was replaced, not written through
    assert not paths["html"].is_symlink() and paths["html"].read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in (tmp_path / "run" / "costaware").iterdir()) == [
        "ledger.jsonl", "report.html", "report.json", "report.md"]  # no temporary file left
    with pytest.raises(ValueError, match="outside"):
        atomic_write(tmp_path / "elsewhere.txt", "x", within=tmp_path / "run")


def _folder_state(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_a_failed_write_leaves_the_old_report_and_no_temporary_file(tmp_path, monkeypatch):
    import costaware.report.write as W

    write_ledger(tmp_path, make_records()[0])
    write_report(tmp_path)
    folder = tmp_path / "costaware"
    before = _folder_state(folder)

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the rename fails: the old file stays, the temporary file goes
        m.setattr(W.os, "replace", refuse)
        with pytest.raises(OSError, match="No space left"):
            write_report(tmp_path)
    assert _folder_state(folder) == before

    def broken(report):
        raise RuntimeError("renderer bug")

    with monkeypatch.context() as m:  # a rendering fails: nothing is written, not even report.json
        m.setattr(W, "render_html", broken)
        with pytest.raises(RuntimeError, match="renderer bug"):
            write_report(tmp_path)
    assert _folder_state(folder) == before


def test_written_files_follow_the_umask_and_the_folder_is_synced(tmp_path, monkeypatch):
    write_ledger(tmp_path, make_records()[0])
    synced_dirs = []
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced_dirs.append(fd)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for umask, mode in ((0o077, "0o600"), (0o027, "0o640")):
        old = os.umask(umask)
        try:
            paths = write_report(tmp_path)
        finally:
            os.umask(old)
        assert {oct(p.stat().st_mode & 0o777) for p in paths.values()} == {mode}
        if umask == 0o077:
            assert len(synced_dirs) == 3  # one per file, after its rename


def test_a_report_is_written_next_to_the_ledger_named_not_the_one_it_was_built_from(tmp_path):
    write_ledger(tmp_path / "a", make_records(run_id="run-a")[0])
    write_ledger(tmp_path / "b", make_records(run_id="run-b")[0])
    report_of_b = build_report(tmp_path / "b")
    with pytest.raises(ValueError, match="refusing to write it next to another run's ledger"):
        write_report(tmp_path / "a", report=report_of_b)
    assert sorted(p.name for p in (tmp_path / "a" / "costaware").iterdir()) == ["ledger.jsonl"]
    assert sorted(p.name for p in (tmp_path / "b" / "costaware").iterdir()) == ["ledger.jsonl"]
    # The same ledger named another way is fine, and the files land next to it.
    paths = write_report(tmp_path / "a", report=build_report(tmp_path / "a" / "costaware" / "ledger.jsonl"))
    assert {p.parent for p in paths.values()} == {tmp_path / "a" / "costaware"}
    assert json.loads(paths["json"].read_text())["run"]["run_id"] == "run-a"


# ------------------------------------------------------------------------------------------------
# Loggers
# ------------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.calls = []

    def log_artifact(self, run_id, path, artifact_path=None):
        self.calls.append(("log_artifact", run_id, Path(path).name, artifact_path))

    def save(self, path, base_path=None, policy="live"):
        self.calls.append(("save", Path(path).name, policy))


class MLFlowLogger:  # named like Lightning's: only the duck-typed surface is used
    def __init__(self):
        self.experiment, self.run_id = _Recorder(), "mlflow-run-1"


class WandbLogger:
    def __init__(self):
        self.experiment = _Recorder()


class TensorBoardLogger:
    @property
    def experiment(self):
        raise RuntimeError("writer closed")


def test_publish_to_loggers_is_duck_typed_and_never_raises(tmp_path):
    write_ledger(tmp_path, make_records()[0])
    paths = write_report(tmp_path)
    mlflow, wandb, broken = MLFlowLogger(), WandbLogger(), TensorBoardLogger()
    with pytest.warns(RuntimeWarning, match="could not hand the report to TensorBoardLogger: RuntimeError"):
        done = publish_to_loggers([mlflow, broken, object(), wandb], paths)
    assert done == ["MLFlowLogger: 3 artifacts in costaware/", "WandbLogger: 3 files saved"]
    assert mlflow.experiment.calls == [("log_artifact", "mlflow-run-1", n, "costaware")
                                       for n in ("report.json", "report.md", "report.html")]
    assert [c[1] for c in wandb.experiment.calls] == ["report.json", "report.md", "report.html"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert publish_to_loggers(None, paths) == []
        assert publish_to_loggers(WandbLogger(), list(paths.values())) == ["WandbLogger: 3 files saved"]
    with pytest.warns(RuntimeWarning):
        assert publish_to_loggers([mlflow], 42) == []  # bad paths: a warning, not an error


@pytest.mark.parametrize("as_type", [str, Path])
def test_publish_one_path_is_one_artifact(tmp_path, as_type):
    write_ledger(tmp_path, make_records()[0])
    md = write_report(tmp_path)["md"]
    mlflow, wandb = MLFlowLogger(), WandbLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = publish_to_loggers([mlflow, wandb], as_type(md))
    assert done == ["MLFlowLogger: 1 artifacts in costaware/", "WandbLogger: 1 files saved"]
    assert mlflow.experiment.calls == [("log_artifact", "mlflow-run-1", "report.md", "costaware")]
    assert [c[1] for c in wandb.experiment.calls] == ["report.md"]


# ------------------------------------------------------------------------------------------------
# A real browser (runs by default; skips where Debian's chromium is missing)
# ------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs headless Chromium (apt-get install chromium)")
def test_html_renders_in_headless_chromium(tmp_path):
    curve = {"usd": [0.5, 1.0, 2.0], "value": [0.6, 0.7, 0.8]}
    records, _ = make_records(max_steps=1000, events=[
        {"name": "marginal_gain_decision", "monitor": "val_acc", "stop": True, "reason": "not worth it",
         "predicted_final": 0.92, "usd_to_predicted_final": 1.5, "curve_points": curve},
        {"name": "budget_cap_hit", "cap": "max_usd", "limit": 3.4, "value": 3.5}])
    write_ledger(tmp_path / "run", records)
    html = write_report(tmp_path / "run")["html"]
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    png = tmp_path / "shot.png"
    shot = subprocess.run(flags + [f"--screenshot={png}", "--window-size=1200,2000", html.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert png.is_file(), shot.stderr[-2000:]
    assert "Uncaught" not in shot.stderr and "Refused to" not in shot.stderr, shot.stderr[-2000:]
    from PIL import Image

    image = Image.open(png).convert("L")
    low, high = image.getextrema()
    assert high - low > 100  # text and charts drawn, not a blank page
    assert len(image.resize((120, 200)).getcolors(maxcolors=256) or ()) > 10  # many grey levels, not a flat page
    dom = subprocess.run(flags + ["--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Uncaught" not in dom.stderr
    for chart in ("chart-cost", "chart-breakdown", "chart-energy", "chart-metric-0", "chart-power"):
        assert re.search(rf'<svg[^>]*id="{chart}"', dom.stdout), chart
    assert dom.stdout.count("<polyline") >= 4
