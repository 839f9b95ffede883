"""Run by test_ddp.py: a two-process DDP fit on CPU (gloo), each rank with its own fake GPU.

Usage: ddp_fit.py OUT_DIR [NODES]. With NODES=2 it is one node of a two-node run launched by
torchrun (test_multinode.py), two processes a node.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fake_nvml import FakeGPU, FakeNVML

sys.modules["pynvml"] = FakeNVML([FakeGPU(power_w=300.0, uuid="GPU-0"), FakeGPU(power_w=500.0, uuid="GPU-1")],
                                 time.monotonic)

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.demos.boring_classes import BoringModel  # noqa: E402

import costaware  # noqa: E402


class Record(pl.Callback):
    def __init__(self, monitor, out):
        self.monitor, self.out = monitor, Path(out)

    def on_fit_end(self, trainer, pl_module):
        mine = self.monitor.meter._mine_at_refresh.to_dict()
        data = {"rank": trainer.global_rank, "node": trainer.node_rank, "mine": mine,
                "totals": self.monitor.totals.to_dict(),
                "ledger": str(self.monitor.ledger.path) if self.monitor.ledger.path else None}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(data))


if __name__ == "__main__":
    out = sys.argv[1]
    nodes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    monitor = costaware.CostMonitor(nvml_index=local_rank, usd_per_gpu_hour=2.0, usd_per_host_hour=1.0,
                                    cpu_tdp_w=10, ram_power_w=3, sample_interval_s=0.05)
    trainer = pl.Trainer(accelerator="cpu", devices=2, num_nodes=nodes, strategy="ddp", max_steps=30,
                         log_every_n_steps=5,
                         limit_val_batches=2, limit_test_batches=2, val_check_interval=10, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out, callbacks=[monitor, Record(monitor, out)])
    model = BoringModel()
    trainer.fit(model)
    trainer.test(model, verbose=False)  # after the fit: rank zero meters it for the run, no collective
    # As PyTorch asks of every script: a gloo process group left to interpreter exit can abort the
    # process ("terminate called without an active exception", pytorch/pytorch#190489), and
    # torchrun then holds the other node at its exit barrier for 300 s.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
