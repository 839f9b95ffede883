"""Run by test_multinode.py under torchrun: one of two simulated nodes of two CPU processes each (gloo)."""

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
from pytorch_lightning.demos.boring_classes import BoringModel  # noqa: E402

import costaware  # noqa: E402


class Record(pl.Callback):
    """Each rank writes the run totals it ends with, so the test can check that all agree."""

    def __init__(self, monitor, out):
        self.monitor, self.out = monitor, Path(out)

    def on_fit_end(self, trainer, pl_module):
        data = {"rank": trainer.global_rank, "node": trainer.node_rank, "totals": self.monitor.totals.to_dict()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(data))


if __name__ == "__main__":
    out = sys.argv[1]
    local_rank = int(os.environ["LOCAL_RANK"])
    monitor = costaware.CostMonitor(nvml_index=local_rank, usd_per_gpu_hour=2.0, usd_per_host_hour=1.0,
                                    cpu_tdp_w=10, ram_power_w=3, sample_interval_s=0.05)
    trainer = pl.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", max_steps=20,
                         log_every_n_steps=5, limit_val_batches=2, val_check_interval=10, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out, callbacks=[monitor, Record(monitor, out)])
    trainer.fit(BoringModel())
