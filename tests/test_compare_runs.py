"""``costaware compare`` on real tiny runs, from a shell: the monitored metric at its total cost, the
Pareto front first, runs monitoring different metrics in separate groups, short readable labels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_clocked_model
from costaware import CostMonitor, MarginalGainStopping
from costaware.report import build_report
from costaware.report.compare import run_labels

REPO = Path(__file__).resolve().parents[1]


def _fit(pl_ns, root, clock, max_steps, callbacks, model=None):
    trainer = pl_ns.Trainer(max_steps=max_steps, val_check_interval=3, limit_val_batches=2, default_root_dir=root,
                            callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False)
    trainer.fit(model or make_clocked_model(pl_ns.BoringModel, clock, step_s=2.0))


def _with_accuracy(base, clock):
    """A clocked model that also logs an accuracy, rising with the steps."""

    class Model(type(make_clocked_model(base, clock))):
        def validation_step(self, batch, batch_idx):
            self.log("val_acc", 0.5 + 0.01 * self.trainer.global_step)
            return super().validation_step(batch, batch_idx)

    return Model()


@pytest.fixture
def runs(pl_ns, tmp_path, clock):
    """Three real runs: two that only log val_loss (3 and 9 steps), one whose MarginalGainStopping
    monitors val_acc (it logs val_loss too: the policy's metric decides its group)."""
    root = tmp_path / "experiments"
    for name, steps in (("short", 3), ("long", 9)):
        monitor = CostMonitor(usd_per_host_hour=3.6)
        monitor.meter.clock = clock
        _fit(pl_ns, root / name, clock, steps, [monitor])
    stopping = MarginalGainStopping(monitor="val_acc", usd_per_point=1.0, min_points=50,
                                    monitor_kwargs={"usd_per_host_hour": 3.6})
    stopping.own_meter.clock = clock
    _fit(pl_ns, root / "probe_acc", clock, 6, [stopping], model=_with_accuracy(pl_ns.BoringModel, clock))
    return root


def _shell(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "costaware.cli", "compare", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def test_compare_groups_by_monitored_metric_and_ranks_the_front_first(runs):
    done = _shell("short", "long", "probe_acc", "--json", cwd=runs)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    groups = {g["metric"]: g for g in result["groups"]}
    assert set(groups) == {"val_loss", "val_acc"} and result["unranked"] == []
    loss, acc = groups["val_loss"], groups["val_acc"]
    assert loss["mode"] == "min" and acc["mode"] == "max"  # guessed from the name; the policy's mode
    assert [r["name"] for r in acc["runs"]] == ["probe_acc"]
    # Each run's total is its report's total, every phase included; the longer run costs more.
    for group in result["groups"]:
        for run in group["runs"]:
            report = build_report(runs / run["name"])
            assert run["usd"] == pytest.approx(report["phases"]["total_usd"])
            assert run["usd"] == pytest.approx(report["totals"]["usd"])  # (no strategies after these fits)
    by_name = {r["name"]: r for r in loss["runs"]}
    assert by_name["long"]["usd"] > by_name["short"]["usd"] > 0
    front = [r for r in loss["runs"] if r["pareto"]]
    assert loss["runs"][:len(front)] == front and [r["rank"] for r in loss["runs"]] == [1, 2]

    text = _shell("short", "long", "probe_acc", cwd=runs)
    assert text.returncode == 0, text.stderr
    assert "The runs monitor 2 different metrics: each is ranked only against runs that monitor the same one" \
        in text.stdout
    assert "val_loss (min is best): 2 run(s)" in text.stdout and "val_acc (max is best): 1 run(s)" in text.stdout
    assert "/" not in "".join(line.split()[1] for line in text.stdout.splitlines() if line[:1].isdigit())


def test_compare_one_metric_for_every_run_and_an_html_page(runs, tmp_path):
    page = tmp_path / "cmp.html"
    done = _shell("short", "long", "probe_acc", "--metric", "val_loss", "--out", str(page), "--json", cwd=runs)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.split("\nwrote ")[0])
    assert [g["metric"] for g in result["groups"]] == ["val_loss"] and len(result["runs"]) == 3
    html = page.read_text()
    assert 'id="ranking-0"' in html and 'id="chart-pareto-0"' in html and "<script" not in html


def test_a_test_after_the_fit_is_in_a_run_s_total_and_said_so(pl_ns, tmp_path, clock):
    monitor = CostMonitor(usd_per_host_hour=3.6)
    monitor.meter.clock = clock
    trainer = pl_ns.Trainer(max_steps=3, val_check_interval=3, limit_val_batches=2, limit_test_batches=2,
                            default_root_dir=tmp_path / "tested", callbacks=[monitor], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    model = make_clocked_model(pl_ns.BoringModel, clock, step_s=2.0)
    trainer.fit(model)
    model.test_step = lambda batch, batch_idx: clock.advance(5.0)
    trainer.test(model, verbose=False)
    done = _shell("tested", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)["groups"][0]["runs"][0]
    assert run["usd"] == pytest.approx(0.006 + 0.010)  # the fit (3 x 2 s) and its test (2 x 5 s), $0.001 a second
    text = _shell("tested", cwd=tmp_path)
    assert "$0.01 of test/validate/predict after the fit" in text.stdout, text.stdout


def test_run_labels_drop_what_every_run_shares():
    assert run_labels(["runs/lora/lightning_logs/version_0/costaware", "runs/full/lightning_logs/version_0"],
                      ["a", "b"]) == ["lora", "full"]
    assert run_labels(["/abs/x/ledger.jsonl", "/abs/y/costaware/ledger.jsonl"], ["a", "b"]) == ["x", "y"]
    assert run_labels(["same", "same"], ["0123456789", "abcdefghij"]) == ["same (01234567)", "same (abcdefgh)"]
    assert run_labels(["only/one/run"], ["a"]) == ["only/one/run"]


def test_one_metric_is_ranked_in_one_group_whatever_each_run_states():
    """Runs of one metric, some whose policy states its mode and some without a policy: one group,
    in the mode stated (was: the runs without a policy were guessed into a second group)."""
    from costaware.report.compare import _mode_per_metric

    stated = [("score", "min"), ("score", None), ("score", None), ("val_acc", None)]
    assert _mode_per_metric(stated, None) == {"score": "min", "val_acc": "max"}
    assert _mode_per_metric([("score", "min"), ("score", "max"), ("score", "max")], None) == {"score": "max"}
    assert _mode_per_metric(stated, "max") == {"score": "max", "val_acc": "max"}  # --mode wins


def test_an_svg_holds_every_groups_plot(runs, tmp_path):
    """--out x.svg with runs of two metrics: both plots, stacked in one well-formed SVG."""
    import xml.etree.ElementTree as ET

    out = tmp_path / "pareto.svg"
    done = _shell("short", "long", "probe_acc", "--out", str(out), cwd=runs)
    assert done.returncode == 0, done.stderr
    root = ET.fromstring(out.read_text())
    charts = [child for child in root if child.tag.endswith("svg")]
    assert [c.get("id") for c in charts] == ["chart-pareto-0", "chart-pareto-1"]
    assert float(charts[1].get("y")) == float(charts[0].get("height")) > 0
    assert float(root.get("height")) == sum(float(c.get("height")) for c in charts)
