"""Run by test_ddp.py: a two-process DDP fit that checkpoints, then a resumed one (gloo, CPU).

Usage: ddp_resume.py OUT_DIR first|resume. ``first`` fits 20 steps and checkpoints at 10 and 20;
``resume`` goes on from the step-10 checkpoint to step 26. Rank 1 resumes from a copy of it whose
ledger path does not exist there, as with node-local log dirs: it cannot read what the ledger
recorded after the checkpoint, which rank 0 can.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import ddp_fit  # noqa: F401  (installs the same two fake GPUs before Lightning is imported)

# isort: split
import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.boring_classes import BoringModel

import costaware


class Record(pl.Callback):
    def __init__(self, monitor, out):
        self.monitor, self.out = monitor, Path(out)

    def on_fit_end(self, trainer, pl_module):
        data = {"totals": self.monitor.totals.to_dict(), "resumed_from": self.monitor.meter._resumed_from}
        (self.out / f"resumed_rank{trainer.global_rank}.json").write_text(json.dumps(data))


def _checkpoint_for(rank: int, out: Path) -> Path:
    ckpt = out / "ckpt" / "epoch=0-step=10.ckpt"
    if rank == 0:
        return ckpt
    state = torch.load(ckpt, weights_only=False)
    for key, value in state["callbacks"].items():
        if key.startswith("CostMonitor"):
            value["ledger_path"] = str(out / "node1" / "ledger.jsonl")  # not there on this "node"
    copy = out / "rank1.ckpt"
    torch.save(state, copy)
    return copy


if __name__ == "__main__":
    out, phase = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ.get("LOCAL_RANK", 0))
    monitor = costaware.CostMonitor(nvml_index=rank, usd_per_gpu_hour=2.0, usd_per_host_hour=1.0,
                                    cpu_tdp_w=10, ram_power_w=3, sample_interval_s=0.05)
    first = phase == "first"
    callbacks = [monitor, pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=10, save_top_k=-1)
                 if first else Record(monitor, out)]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=20 if first else 26,
                         log_every_n_steps=5, limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out, callbacks=callbacks,
                         enable_checkpointing=first)
    trainer.fit(BoringModel(), ckpt_path=None if first else _checkpoint_for(rank, out))
    if torch.distributed.is_initialized():  # see ddp_fit.py
        torch.distributed.destroy_process_group()
