"""``costaware report | compare | prices``: output, files and exit codes (0 ok, 1 bad input, 2 usage)."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from costaware.cli import main
from test_report import killed_ledger, make_records, write_ledger


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def in_subprocess(tmp_path_factory):
    """Two real ``python -m costaware.cli`` processes, started together (importing Lightning is slow)."""
    tmp = tmp_path_factory.mktemp("cli")
    killed_ledger(tmp / "killed")
    commands = {
        "killed": ["report", str(tmp / "killed")],
        "missing": ["report", str(tmp / "missing")],
    }
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "costaware.cli", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env) for name, args in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return tmp, results


def test_subprocess_report_of_a_killed_run(in_subprocess):
    tmp, results = in_subprocess
    code, out, err = results["killed"]
    assert code == 0, err
    assert "truncated last line (the run was probably killed)" in err
    assert "no end record: the run was killed, or is still running" in out
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp / "killed" / "costaware" / name).is_file()
        assert f"wrote {tmp / 'killed' / 'costaware' / name}" in out


def test_subprocess_exit_codes(in_subprocess):
    tmp, results = in_subprocess
    code, out, err = results["missing"]
    assert (code, out) == (1, "") and err.strip() == f"costaware: error: {tmp / 'missing'} does not exist"


@pytest.mark.parametrize("command", ["report", "compare", "prices"])
def test_help_for_each_subcommand(capsys, command):
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: costaware {command}")


def test_no_command_or_a_bad_option_is_a_usage_error(capsys):
    code, _, err = _run(capsys)
    assert code == 2 and "report" in err and "compare" in err
    code, _, err = _run(capsys, "compare")
    assert code == 2 and "the following arguments are required: RUN_DIR" in err
    code, _, err = _run(capsys, "report", "x", "--print", "pdf")
    assert code == 2 and "invalid choice: 'pdf'" in err


def test_report_writes_the_files_and_prints_a_summary(capsys, tmp_path):
    records, end_totals = make_records()
    write_ledger(tmp_path / "run", records)
    code, out, err = _run(capsys, "report", str(tmp_path / "run"))
    assert (code, err) == (0, "")
    assert "Dollars: $3.50" in out and "wrote" in out
    report = json.loads((tmp_path / "run" / "costaware" / "report.json").read_text())
    assert report["totals"] == end_totals
    code, out, _ = _run(capsys, "report", str(tmp_path / "run" / "costaware" / "ledger.jsonl"), "--print", "json")
    assert code == 0 and json.loads(out)["totals"] == end_totals


def test_report_of_bad_ledgers(capsys, tmp_path):
    records, _ = make_records()
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "{broken")
    write_ledger(tmp_path / "corrupt", records, lines)
    code, out, err = _run(capsys, "report", str(tmp_path / "corrupt"), "--print", "none")
    assert (code, out) == (0, "") and "ledger.jsonl:4: corrupt line, skipped" in err

    write_ledger(tmp_path / "newer", make_records(schema=3)[0])
    code, out, err = _run(capsys, "report", str(tmp_path / "newer"), "--print", "none")
    assert code == 1 and "newer than this costaware reads" in err and "the report was written anyway" in err
    assert (tmp_path / "newer" / "costaware" / "report.html").is_file()

    (tmp_path / "empty").mkdir()
    code, out, err = _run(capsys, "report", str(tmp_path / "empty"))
    assert code == 1 and "no costaware ledger in" in err and out == ""


def _runs(tmp_path):
    shapes = {"cheap": (0.88, 60.0), "dear": (0.92, 720.0), "mid": (0.90, 240.0)}
    for name, (top, step_s) in shapes.items():
        records, _ = make_records(step_s=step_s, metrics=("val_loss", "val_acc"),
                                  accuracy=lambda i, top=top: top - 0.3 * 0.7 ** i)
        write_ledger(tmp_path / name, records)
    return [str(tmp_path / name) for name in shapes]


def test_compare_ranks_the_pareto_front_by_metric(capsys, tmp_path):
    runs = _runs(tmp_path)
    out_html, out_svg = tmp_path / "cmp" / "runs.html", tmp_path / "cmp" / "pareto.svg"
    code, out, err = _run(capsys, "compare", *runs, "--metric", "val_acc", "--out", str(out_html))
    assert (code, err) == (0, "")
    table = out.split("-----")[-1].splitlines()
    ranked = [line.split()[1] for line in table if line[:1].isdigit()]
    assert ranked == ["dear", "mid", "cheap"]  # all on the front (more accuracy costs more): by accuracy
    html = out_html.read_text()
    assert 'id="chart-pareto-0"' in html and 'class="pareto"' in html and "<script" not in html
    code, out, _ = _run(capsys, "compare", *runs, "--metric", "val_acc", "--out", str(out_svg), "--json")
    result = json.loads(out.split("\nwrote ")[0])
    assert code == 0 and [r["pareto"] for r in result["runs"]] == [True, True, True]
    assert "score" not in result["runs"][0] and [g["metric"] for g in result["groups"]] == ["val_acc"]
    assert ET.fromstring(out_svg.read_text()).tag.endswith("svg")


def test_compare_default_metric_and_mode(capsys, tmp_path):
    runs = _runs(tmp_path)
    code, out, _ = _run(capsys, "compare", *runs, "--json")
    result = json.loads(out)
    # The first metric every run records is val_loss: lower is best, guessed from its name.
    assert code == 0 and (result["metric"], result["mode"]) == ("val_loss", "min")
    code, out, _ = _run(capsys, "compare", *runs, "--metric", "val_acc", "--mode", "min", "--json")
    assert code == 0 and json.loads(out)["mode"] == "min"


def test_compare_errors(capsys, tmp_path):
    runs = _runs(tmp_path)
    code, _, err = _run(capsys, "compare", *runs, "--metric", "bleu")
    assert code == 2 and "metric 'bleu' is recorded by none of the runs; recorded: val_acc, val_loss" in err
    write_ledger(tmp_path / "other", make_records(metrics=("bleu",))[0])
    code, out, err = _run(capsys, "compare", runs[0], str(tmp_path / "other"))  # different metrics: two groups
    assert (code, err) == (0, "") and "The runs monitor 2 different metrics" in out
    code, out, err = _run(capsys, "compare", runs[0], str(tmp_path / "nowhere"), "--metric", "val_acc")
    assert code == 1 and "skipped" in err and "1 run(s)" in out  # what could be read is still ranked
    code, _, err = _run(capsys, "compare", str(tmp_path / "nowhere"))
    assert code == 1 and "no run could be read" in err


def test_compare_exits_1_when_a_ledger_is_read_best_effort(capsys, tmp_path):
    runs = _runs(tmp_path)
    write_ledger(tmp_path / "newer", make_records(schema=3, metrics=("val_acc",))[0])
    code, out, err = _run(capsys, "compare", *runs, str(tmp_path / "newer"), "--metric", "val_acc")
    assert code == 1 and "4 run(s)" in out and "ledger not trusted" in out  # still ranked and shown
    assert f"{tmp_path / 'newer'} could only be read best-effort" in err and "newer than this costaware reads" in err


def test_compare_ignores_nan_and_non_numeric_points(capsys, tmp_path):
    runs = _runs(tmp_path)
    records, _ = make_records(metrics=("val_acc",), accuracy=lambda i: float("nan") if i == 3 else 0.1)
    records[2 * 5]["usd"] = "cheap"  # a dollar figure that is not a number: the point is dropped, no crash
    write_ledger(tmp_path / "diverged", records)
    allnan, _ = make_records(metrics=("val_acc",), accuracy=lambda i: float("inf") if i % 2 else float("nan"))
    write_ledger(tmp_path / "allnan", allnan)
    code, out, err = _run(capsys, "compare", *runs, str(tmp_path / "diverged"), str(tmp_path / "allnan"),
                          "--metric", "val_acc", "--json")
    result = json.loads(out)
    assert (code, err) == (0, "")
    ranked = {r["source"].rsplit("/", 1)[-1]: r for r in result["runs"]}
    assert list(ranked)[-1] == "diverged" and ranked["diverged"]["best"] == pytest.approx(0.1)
    assert ranked["diverged"]["evaluations"] == 8 and not ranked["diverged"]["pareto"]
    assert [r["rank"] for r in result["runs"]] == [1, 2, 3, 4] and next(iter(ranked)) == "dear"
    assert [(u["source"].rsplit("/", 1)[-1], u["reason"]) for u in result["unranked"]] == [
        ("allnan", "no finite val_acc with its cost recorded")]


def test_report_with_non_numeric_prices(capsys, tmp_path):
    records, _ = make_records()
    records[0]["prices"] = {**records[0]["prices"], "usd_per_gpu_hour": "3", "pue": "n/a"}
    write_ledger(tmp_path, records)
    code, out, err = _run(capsys, "report", str(tmp_path))
    assert code == 0 and "Dollars: $3.50" in out
    assert "costaware: warning: header price usd_per_gpu_hour is not a finite number (3)" in err
    assert "| PUE | n/a |" in (tmp_path / "costaware" / "report.md").read_text()


def test_report_of_an_unreadable_ledger(capsys, tmp_path, monkeypatch):
    import costaware.report.build as B

    write_ledger(tmp_path, make_records()[0])

    def denied(path, lenient=False):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(B, "read_ledger", denied)  # the tests run as root, where chmod 000 does not deny
    code, out, err = _run(capsys, "report", str(tmp_path))
    assert (code, out) == (1, "")
    assert err.startswith(f"costaware: error: could not read the ledger in {tmp_path}: [Errno 13] Permission denied")
    assert "Traceback" not in err


def test_prices(capsys):
    code, out, _ = _run(capsys, "prices")
    assert code == 0
    assert "H100-SXM" in out and "Lambda Cloud" in out and "2025-06" in out
    assert "FRA" in out and "France" in out and "gcp" in out and "us-central1" in out
    code, out, _ = _run(capsys, "prices", "--cloud", "--json")
    data = json.loads(out)
    assert code == 0 and list(data) == ["cloud_regions"] and len(data["cloud_regions"]) > 10
    assert all(r["g_co2_per_kwh"] >= 0 for r in data["cloud_regions"])
    code, out, _ = _run(capsys, "prices", "--gpus", "--countries", "--json")
    data = json.loads(out)
    assert {g["model"] for g in data["gpus"]} >= {"H100-SXM", "A100", "T4"}
    assert next(c for c in data["countries"] if c["iso3"] == "FRA")["g_co2_per_kwh"] == pytest.approx(56.039)


def test_compare_defaults_to_a_validation_metric_over_a_training_loss(capsys, tmp_path):
    """A run without a policy is ranked by its first val* metric, not a training loss logged per step."""
    for name in ("a", "b"):
        write_ledger(tmp_path / name, make_records(metrics=("train_loss", "val_acc"))[0])
    code, out, _ = _run(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json")
    result = json.loads(out)
    assert code == 0 and [g["metric"] for g in result["groups"]] == ["val_acc"]
    assert [r["name"] for r in result["runs"]] in (["a", "b"], ["b", "a"])
