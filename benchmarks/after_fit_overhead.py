"""What metering a ``trainer.test`` after the fit adds to it: plain Lightning against ``CostMonitor``, in one run.

Each round fits the same small MLP twice (plain, then with ``CostMonitor``; the order alternates by
round) and then times ``trainer.test`` on the same in-memory batches, wall clock around the call.
With ``CostMonitor`` the call opens the stage's meters (codecarbon's host meter, a sampler thread),
appends one ledger line and rebuilds the fit's report; those three parts are timed inside the call
too. Printed: per variant the median and range over rounds, the difference per round, and the parts.

Usage::

    python benchmarks/after_fit_overhead.py --rounds 9 --out benchmarks/results/after_fit_overhead.txt
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import costaware.after_fit as after_fit
import costaware.meter as meter_module
from costaware import CostMonitor


class MLP(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(batches: int, batch: int, width: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch, width, generator=generator)
    y = torch.randint(0, 10, (batches * batch,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def timed_parts() -> dict[str, list[float]]:
    """Wrap the three parts of a metered stage to record their wall time (ms) per call."""
    parts: dict[str, list[float]] = {"open meters": [], "close + ledger line": [], "rebuild report": []}

    def wrap(owner: Any, name: str, part: str) -> None:
        original: Callable = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                parts[part].append(1000 * (time.perf_counter() - start))

        setattr(owner, name, timed)

    wrap(after_fit.StageMeter, "__init__", "open meters")
    wrap(after_fit.StageMeter, "close", "close + ledger line")
    wrap(after_fit.StageMeter, "append", "close + ledger line")
    wrap(meter_module.CostMeter, "_write_report", "rebuild report")
    return parts


def test_call_ms(metered: bool, args: argparse.Namespace, parts: dict) -> float:
    with tempfile.TemporaryDirectory() as root:
        callbacks = [CostMonitor(usd_per_host_hour=1.0)] if metered else []
        trainer = pl.Trainer(max_steps=args.fit_steps, callbacks=callbacks, default_root_dir=root, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0)
        model = MLP(args.width)
        trainer.fit(model, loader(args.fit_steps, args.batch, args.width))
        fit_reports = len(parts["rebuild report"])
        start = time.perf_counter()
        trainer.test(model, loader(args.test_batches, args.batch, args.width), verbose=False)
        elapsed_ms = 1000 * (time.perf_counter() - start)
        del parts["rebuild report"][:fit_reports]  # the fit's own report is not the test's
        return elapsed_ms


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--test-batches", type=int, default=100)
    parser.add_argument("--fit-steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    parts = timed_parts()
    test_call_ms(True, args, parts)  # a first round of each, discarded: a process's one-time costs
    test_call_ms(False, args, parts)
    for values in parts.values():
        values.clear()
    plain, metered = [], []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for is_metered in order:
            (metered if is_metered else plain).append(test_call_ms(is_metered, args, parts))

    def summary(values: list[float]) -> str:
        return f"median {statistics.median(values):8.1f} ms  (range {min(values):.1f}-{max(values):.1f})"

    lines = [
        "trainer.test after a fit: plain Lightning against CostMonitor (benchmarks/after_fit_overhead.py)",
        f"{args.rounds} rounds, interleaved; test pass: {args.test_batches} batches of {args.batch} x {args.width} "
        f"through an MLP, one torch thread; wall time of the trainer.test call",
        f"  plain          {summary(plain)}",
        f"  CostMonitor    {summary(metered)}",
        f"  difference     {summary([m - p for m, p in zip(metered, plain)])}  (per round)",
        "  parts of the metered call (median per call):",
        *[f"    {name:22s} {statistics.median(values):6.1f} ms" for name, values in parts.items() if values],
        f"torch {torch.__version__}, pytorch_lightning {pl.__version__}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
