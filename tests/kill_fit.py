"""Run by test_fault_sweep.py: a fit that checkpoints often and writes its ledger often, to be killed.

Usage: kill_fit.py OUT_DIR MAX_STEPS [CKPT]. Steps take ~20 ms of real time; dollars are seconds
(usd_per_host_hour=3600) so totals are easy to compare.
"""

import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel

import costaware


class Slow(BoringModel):
    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    out, max_steps = sys.argv[1], int(sys.argv[2])
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    monitor = costaware.CostMonitor(usd_per_host_hour=3600.0, cpu_tdp_w=10, ram_power_w=3, flush_interval_s=0.1,
                                    sample_interval_s=0.05, ledger_dir=f"{out}/costaware")
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=f"{out}/ckpt", save_last=True, every_n_train_steps=5,
                                               save_top_k=-1)
    trainer = pl.Trainer(max_steps=max_steps, log_every_n_steps=2, limit_val_batches=2, val_check_interval=10,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                         callbacks=[monitor, checkpoints])
    trainer.fit(Slow(), ckpt_path=ckpt)
    print("FINISHED", trainer.global_step)
