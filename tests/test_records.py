"""Typed ledger records: one writer and one reader, old ledgers still read, and no line can crash the reader."""

import json
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from costaware import records as R
from costaware.cli import main
from costaware.ledger import SCHEMA_VERSION, Ledger, Totals, read_ledger
from costaware.report import build_report
from test_report import make_records, write_ledger

DATA = Path(__file__).parent / "data"
SRC = Path(__file__).resolve().parent.parent / "src"


def _filled(cls):
    """An instance of a record class with every field set to a value of its declared type."""
    values = {float: 1.5, int: 3, str: "x", bool: True, dict: {"a": 1}, list: [1, "b"]}
    kwargs = {}
    for name, kind in R._declared(cls).items():
        if kind is R.RecordedTotals:
            kwargs[name] = R.RecordedTotals.of(Totals(usd=2.0, elapsed_s=10.0))
        elif kind is R.Header:
            kwargs[name] = R.Header(run_id="r", schema=2)
        else:
            kwargs[name] = values.get(kind, "any")
    return cls(**{**kwargs, "wall_time_s": 1.75e9})


@pytest.mark.parametrize("cls", [*R.RECORDS.values(), *R.EVENTS.values()], ids=lambda c: c.__name__)
def test_every_record_kind_reads_back_as_written(cls):
    record = _filled(cls)
    line = json.dumps(R.to_dict(record))
    assert R.from_dict(json.loads(line)) == record


def test_schema_1_ledgers_written_before_typed_records_are_read():
    contents = read_ledger(DATA / "ledger_v1_marginal_gain.jsonl")
    assert not contents.problems and contents.header.schema == 1 and contents.end.how == "marginal_gain"
    assert all(s.wall_time_s and "throughput_batches_per_s" in s.readings for s in contents.samples)
    decisions = [e for e in contents.events if isinstance(e, R.MarginalGainDecisionEvent)]
    assert decisions[-1].stop and decisions[-1].totals.usd > 0 and decisions[-1].curve_points["usd"]
    assert {type(e) for e in contents.events} == {R.BudgetCapsEvent, R.MarginalGainPolicyEvent, R.ForecastEvent,
                                                  R.MarginalGainDecisionEvent, R.StrategyResultEvent}
    report = build_report(DATA / "ledger_v1_marginal_gain.jsonl")
    assert report["outcome"]["why"].startswith("stopped by the marginal-gain policy: not worth it")
    assert report["strategy_results"][0]["role"] == "teacher" and not report["problems"]

    capped = read_ledger(DATA / "ledger_v1_budget_cap.jsonl")
    assert capped.end.how == "budget_cap"  # schema 1 wrote "completed"
    hit = next(e for e in capped.events if isinstance(e, R.BudgetCapHitEvent))
    assert hit.cap == "max_usd" and hit.value > hit.limit == 0.5 and hit.on_cap == "stop"
    assert len([e for e in capped.events if isinstance(e, R.BudgetWarningEvent)]) == 3
    summary = next(e["summary"] for e in build_report(DATA / "ledger_v1_budget_cap.jsonl")["events"]
                   if e["name"] == "budget_cap_hit")
    assert "on cap: stop; checkpoint: " in summary  # what the writer records, not fields it never wrote


def test_the_quantize_result_says_kept_whoever_wrote_it(tmp_path):
    v1_follower = {"name": "quantize", "of": "student", "rows": [
        {"role": "student", "metric": 0.9, "size_bytes": 4000, "note": ""},
        {"role": "quantized", "metric": 0.89, "size_bytes": 1000, "note": "kept: drop 0.01 <= 0.02"}]}
    records, _ = make_records(events=[v1_follower])
    write_ledger(tmp_path / "v1", records)
    event = read_ledger(tmp_path / "v1" / "costaware").events[0]
    assert (event.of, event.float_metric, event.quantized_size_bytes, event.kept) == ("student", 0.9, 1000, None)

    ledger = Ledger(tmp_path / "v2" / "ledger.jsonl")
    from costaware.strategies.base import ModelRow

    rows = [ModelRow(role="student", metric=0.9), ModelRow(role="quantized", metric=0.89, note="kept")]
    ledger.record(R.QuantizeEvent.from_rows(rows, of="student", bits=8, quant_type="int8", kept=True, metric="acc"))
    summary = build_report(tmp_path / "v2" / "ledger.jsonl")["events"][0]["summary"]
    assert summary == "Quantize (int8, the student): acc 0.9 -> 0.89, kept; kept"


def test_strategy_failed_has_a_summary(tmp_path):
    records, _ = make_records(events=[{"name": "strategy_failed", "strategy": "distill", "reason": "not worth it",
                                       "error": "RuntimeError: out of memory"}])
    write_ledger(tmp_path, records)
    summary = build_report(tmp_path)["events"][0]["summary"]
    assert summary == ("Strategy distill failed after the fit (RuntimeError: out of memory); the teacher is kept; "
                       "the run had stopped: not worth it")


def test_an_unknown_event_is_kept_with_a_problem_and_a_bad_field_type_skips_the_line(tmp_path):
    records, _ = make_records(events=[{"name": "from_the_future", "figure_usd": 1.0},
                                      {"name": "budget_cap_hit", "cap": ["not", "text"], "limit": 1.0}])
    write_ledger(tmp_path, records)
    contents = read_ledger(tmp_path / "costaware")
    assert [type(e) for e in contents.events] == [R.UnknownEvent]
    assert contents.events[0].name == "from_the_future" and contents.events[0].extra == {"figure_usd": 1.0}
    assert "unknown event 'from_the_future'" in contents.problems[0]
    assert "corrupt line (BudgetCapHitEvent.cap must be str, got list), skipped" in contents.problems[1]


HOSTILE_LINES = {
    "an integer of 5,000 digits": '{"kind": "metric", "name": "x", "value": ' + "9" * 5000 + "}",
    "brackets nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "JSON that is not an object": "[1, 2, 3]",
    "a string": '"sample"',
    "a totals that is not an object": '{"kind": "sample", "totals": 5}',
    "a kind that is not a string": '{"kind": ["event"]}',
}


@pytest.mark.parametrize("line", HOSTILE_LINES.values(), ids=HOSTILE_LINES.keys())
def test_a_line_json_cannot_read_is_a_corrupt_line_for_report_and_compare(tmp_path, capsys, line):
    records, _ = make_records()
    lines = [json.dumps(r) for r in records]
    lines.insert(3, line)
    write_ledger(tmp_path / "bad", records, lines)
    assert "ledger.jsonl:4: corrupt line" in read_ledger(tmp_path / "bad" / "costaware").problems[0]
    assert main(["report", str(tmp_path / "bad"), "--print", "none"]) == 0
    write_ledger(tmp_path / "good", records)
    assert main(["compare", str(tmp_path / "bad"), str(tmp_path / "good"), "--metric", "val_acc"]) == 0
    assert "2 run(s)" in capsys.readouterr().out


def test_impossible_totals_are_problems(tmp_path):
    records, _ = make_records(samples=3)
    records[1]["totals"]["usd"] = -1.0  # the first sample
    records[-1]["totals"].update(usd=None, gpu_energy_j=float("nan"))
    write_ledger(tmp_path, records)
    problems = build_report(tmp_path)["problems"]
    assert any("impossible totals in 1 sample record: usd is negative" in p for p in problems)
    assert any("impossible totals in 1 end record: usd is null" in p for p in problems)
    assert any("impossible totals in 1 end record: gpu_energy_j is nan" in p for p in problems)


def test_a_resumed_writer_starts_on_a_fresh_line_after_a_torn_one(tmp_path):
    path = tmp_path / "ledger.jsonl"
    first = Ledger(path, run_id="run-a")
    first.record(R.Header())
    first.record(R.MeterDegradedEvent(meter="gpu", status="degraded"))
    path.write_bytes(path.read_bytes()[:-20])  # killed mid-write: the last line torn, no newline
    second = Ledger(path, run_id="run-a")
    second.record(R.Header(resumed_from={"run_id": "run-a", "checkpoint_usd": 1.0}))
    second.record(R.End(totals=R.RecordedTotals.of(Totals(usd=2.0)), how="completed"))
    contents = read_ledger(path)
    assert [type(e) for e in contents.events] == [R.ResumedEvent] and contents.end.how == "completed"
    assert contents.problems == ["ledger.jsonl:2: corrupt line, skipped"]  # the torn line, alone on its line


def test_disk_full_mid_flush_writes_each_record_exactly_once(tmp_path):
    """A real partial write: the file-size limit (RLIMIT_FSIZE) stops a write part-way, as a full disk does."""
    script = textwrap.dedent(f"""
        import resource, signal, sys, warnings
        sys.path.insert(0, {str(SRC)!r})
        from costaware.ledger import Ledger
        from costaware.records import Header, MeterDegradedEvent
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        ledger = Ledger({str(tmp_path / "ledger.jsonl")!r}, flush_interval_s=1e9)
        ledger.record(Header())
        size = ledger.path.stat().st_size
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, hard))
        warnings.simplefilter("ignore")
        for i in range(40):
            ledger.record(MeterDegradedEvent(meter="gpu", status=f"fault {{i}}"))  # each flushes; most fail
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        ledger.flush()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    contents = read_ledger(tmp_path / "ledger.jsonl")
    assert [e.status for e in contents.events] == [f"fault {i}" for i in range(40)] and not contents.problems


def test_the_end_record_says_how_the_run_ended(tmp_path):
    ledger = Ledger(tmp_path / "a.jsonl")
    ledger.record(R.BudgetCapHitEvent(cap="max_usd", on_cap="stop"))
    ledger.record(R.End(how="completed"))
    assert read_ledger(tmp_path / "a.jsonl", lenient=True).end.how == "budget_cap"
    ledger = Ledger(tmp_path / "b.jsonl")
    ledger.record(R.MarginalGainDecisionEvent(stop=False))
    ledger.record(R.End(how="completed"))
    assert read_ledger(tmp_path / "b.jsonl", lenient=True).end.how == "completed"
    with pytest.raises(ValueError, match="how must be one of"):
        Ledger(None).record(R.End(how="exception"))
    assert SCHEMA_VERSION == 2 and {f.name for f in fields(R.End)} >= {"how", "totals", "meters"}


def test_an_interrupted_fit_ends_its_ledger_as_interrupted(tmp_path):
    """Ctrl+C in a real fit (in a subprocess: Lightning then ignores SIGINT and exits)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SRC)!r})
        from pytorch_lightning import Trainer
        from pytorch_lightning.demos.boring_classes import BoringModel
        from costaware import CostMonitor

        class Interrupted(BoringModel):
            def training_step(self, batch, batch_idx):
                if batch_idx == 3:
                    raise KeyboardInterrupt
                return super().training_step(batch, batch_idx)

        trainer = Trainer(max_steps=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, default_root_dir={str(tmp_path)!r},
                          callbacks=[CostMonitor(usd_per_host_hour=1.0, ledger_dir={str(tmp_path / "ledger")!r})])
        trainer.fit(Interrupted())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    contents = read_ledger(tmp_path / "ledger")
    assert contents.end.how == "interrupted" and contents.events[-1].interrupted
    report = build_report(tmp_path / "ledger")
    assert report["outcome"]["how"] == "interrupted" and report["events"][-1]["summary"].startswith(
        "The run was interrupted: KeyboardInterrupt")


def test_every_event_kind_has_its_own_summary_in_the_report(tmp_path):
    """The report reads each known event through its typed fields: none falls back to listing them."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record(R.Header())
    for cls in R.EVENTS.values():
        if cls is not R.ResumedEvent:  # made by the reader from a second header
            ledger.record(_filled(cls))
    ledger.record(R.Header())
    report = build_report(tmp_path / "ledger.jsonl")
    assert len(report["events"]) == len([cls for cls in R.EVENTS.values() if cls.LISTED])
    for event in report["events"]:
        assert not event["summary"].startswith(event["name"]), event["summary"]
