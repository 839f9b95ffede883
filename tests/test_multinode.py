"""Two nodes of two processes each, simulated on this machine with torchrun (gloo, loopback)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from costaware.ledger import read_ledger


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_nodes(out: Path) -> tuple:
    """Both nodes' torchrun, on loopback; (whether both exited 0, their output)."""
    for leftover in out.glob("rank*.json"):
        leftover.unlink()
    script = Path(__file__).with_name("ddp_fit.py")
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(script), str(out), "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=150)[0])
        except subprocess.TimeoutExpired:  # a hang fails here, not forever
            for other in nodes:
                other.kill()
            outputs.append(node.communicate()[0] + "\n(timed out after 150 s)")
    return all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)


@pytest.mark.slow  # four processes (~40 s); CI runs -m slow too
def test_two_nodes_count_each_host_once_and_sum_every_rank(tmp_path):
    ok, output = _run_two_nodes(tmp_path)
    assert ok, "two-node run failed:\n" + output
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert sorted((r["node"], r["rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 2), (1, 3)]
    run = ranks[0]["totals"]
    for other in ranks[1:]:  # every rank ends with the same run totals (wall time is each rank's own)
        assert {k: v for k, v in other["totals"].items() if k != "elapsed_s"} == pytest.approx(
            {k: v for k, v in run.items() if k != "elapsed_s"})
    assert run["train_batches"] == 4 * 30
    wall_h = run["elapsed_s"] / 3600
    # Each rank's clock starts at its own setup (rank 0's, the wall time here, can start late), so
    # compare hosts with GPUs: two hosts for four GPUs (a host counted per rank would be 1:1).
    assert run["gpu_hours"] > 3.0 * wall_h  # four GPUs held
    assert 0.35 < run["host_hours"] / run["gpu_hours"] < 0.7  # two hosts, each counted once
    assert run["usd"] == pytest.approx(2.0 * run["gpu_hours"] + 1.0 * run["host_hours"])
    ledgers = list(tmp_path.rglob("ledger.jsonl"))
    assert len(ledgers) == 1  # global rank zero alone writes
    contents = read_ledger(ledgers[0])
    assert contents.header["world_size"] == 4 and contents.header["num_nodes"] == 2
    assert contents.end["totals"]["usd"] == pytest.approx(run["usd"])
