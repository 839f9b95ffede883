"""The fault sweep kept as tests: processes killed at random moments lose no checkpoint and no cost."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from costaware.ledger import read_ledger
from costaware.report import write_report

_SCRIPT = Path(__file__).with_name("kill_fit.py")


def _start(out: Path, max_steps: int, ckpt=None) -> subprocess.Popen:
    args = [sys.executable, str(_SCRIPT), str(out), str(max_steps)] + ([str(ckpt)] if ckpt else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_after_first_checkpoint(proc: subprocess.Popen, out: Path, delay_s: float) -> None:
    deadline = time.monotonic() + 180
    while not list((out / "ckpt").glob("*.ckpt")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint written in 180 s"
        time.sleep(0.05)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow  # three kills and three resumes in subprocesses (~1 min)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_at_a_random_moment_then_resumed_loses_nothing(tmp_path, seed):
    delay_s = random.Random(seed).uniform(0.0, 1.5)  # during steps, checkpoint saves or ledger writes
    proc = _start(tmp_path, max_steps=400)
    _kill_after_first_checkpoint(proc, tmp_path, delay_s)
    assert proc.returncode == -signal.SIGKILL
    killed = read_ledger(tmp_path / "costaware")
    assert all("truncated last line" in p for p in killed.problems), killed.problems  # no damage but a torn end
    paid_before_kill = killed.last_totals.usd
    assert paid_before_kill > 0
    # Every checkpoint left on disk is loadable (Lightning writes them atomically).
    checkpoints = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    for path in checkpoints:
        torch.load(path, weights_only=False, map_location="cpu")
    resumed = _start(tmp_path, max_steps=60 if seed else 400 + 10, ckpt=tmp_path / "ckpt" / "last.ckpt")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    contents = read_ledger(tmp_path / "costaware")
    assert [e for e in contents.events if e["name"] == "resumed"], contents.problems  # the resume is not lost
    assert len(contents.problems) <= 1, contents.problems  # at most the line torn by the kill
    # The resumed run continues the killed run's totals: what it paid after its checkpoint too.
    assert contents.end["totals"]["usd"] >= paid_before_kill
    report = write_report(tmp_path / "costaware")
    assert Path(report["html"]).is_file()
