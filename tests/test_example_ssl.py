"""The self-supervised example (examples/ssl_digits.py), run as a user would, a few epochs."""

import subprocess
import sys
from pathlib import Path

import pytest

from costaware.ledger import read_ledger

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ssl_digits.py"


@pytest.mark.slow  # the example in a subprocess (~20 s); CI runs -m slow too
def test_ssl_digits_probes_stops_and_quantizes(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("bitsandbytes")
    command = [sys.executable, str(EXAMPLE), "--max-epochs", "4", "--val-every", "1", "--min-points", "3",
               "--out-dir", str(tmp_path), "--no-progress-bar"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("== SimCLR on digits: summary =="):]
    assert "teacher" in summary and "quantized" in summary and "raw pixels" in summary
    verdict = next(line for line in summary.splitlines() if line.startswith("did it pay?"))
    assert "PAID" in verdict or "did NOT pay" in verdict, verdict  # stopped or not, it says plainly
    run_dir = next(tmp_path.glob("lightning_logs/version_*/costaware"))
    shell = subprocess.run([sys.executable, "-m", "costaware.cli", "report", str(run_dir)], capture_output=True,
                           text=True, timeout=120)
    same = [line for line in summary.splitlines() if line.split(":")[0] in ("Outcome", "Wall time", "Dollars",
                                                                             "Energy, total", "CO2", "By phase")]
    assert len(same) == 6 and all(line in shell.stdout.splitlines() for line in same)  # the same words and figures
    assert "strategies $" in next(line for line in same if line.startswith("By phase"))  # the quantization
    ledger = read_ledger(next(tmp_path.glob("lightning_logs/version_*/costaware/ledger.jsonl")))
    assert ledger.end["how"] == "completed" and not ledger.problems
    assert len([m for m in ledger.metrics if m["name"] == "probe/acc"]) == 4  # priced against dollars
    assert [e for e in ledger.events if e["name"] == "marginal_gain_decision"]
