"""Make a corpus of real from-scratch and self-supervised learning curves on this machine.

Every run is real training with plain torch loops (no Lightning, for speed) on scikit-learn's
bundled ``digits`` (1,797 8x8 images, no download):

* ``scratch``: MLPs and small CNNs trained from scratch on the clean images, one-cycle,
  cosine (with warmup), step and constant learning rates, SGD with momentum or AdamW,
  learning rates and widths drawn at random (some too high: runs that diverge or never learn).
* ``scratch-hard``: the same on a harder version of the task -- each image shifted by up to
  one pixel and covered in pixel noise, 10% of the training labels wrong -- whose curves start
  slower and end lower.
* ``ssl``: SimCLR-style contrastive pretraining (two augmented views, NT-Xent loss) of an MLP
  or CNN encoder, watched through an online linear probe (a linear head on the detached
  features, trained on the same batches, as ``costaware.callbacks.OnlineProbe`` does): the
  metric is the probe's validation accuracy, which starts at chance.
* ``pairs`` (``--pairs``, a separate corpus): from scratch on two digits of the harder version
  side by side (8x16 images, 100 classes: 10 x first + second; chance 1%). Top-1 needs both
  digits right, about the product of two per-digit accuracies, so it crawls near chance before
  it rises: the slow start of from-scratch runs on many classes (the issue's top-1 0.006 at 10%
  of a plan).

Cost: training compute in FLOPs (forward x 3 for forward+backward, counted once per
architecture with ``torch.utils.flop_counter``; evaluation not counted), in dollars at a
nominal ``USD_PER_PFLOP`` (1e6: no GPU sells compute that dear) chosen so that a typical run
costs about $10, the dollar scale of the issue's image classifiers, so prices per point read
alike. The stopping policy's decisions do not depend on this scale when the price per point
scales with it. FLOPs, unlike time on this shared 2-core machine, are reproducible.

Output: one run a line in the generic JSONL that ``benchmarks/replay_curves.py --generic``
reads, each point ``[cumulative_cost_usd, val_acc, lr]`` (``lr``: the first parameter
group's learning rate at that evaluation), with ``planned_cost_usd`` (the planned steps'
cost), ``baseline`` (the validation set's majority-class share: a model that learned nothing),
``anneals`` (whether the schedule anneals: not ``constant``), ``kind`` and the run's ``config``.

Usage::

    nice -n 10 python benchmarks/make_curves.py --out benchmarks/curves/digits.jsonl   # ~24 min on 2 busy cores
    python benchmarks/make_curves.py --late-step --out benchmarks/curves/digits_late_step.jsonl
    python benchmarks/make_curves.py --pairs --out benchmarks/curves/digits_pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

SEED = 20261204
USD_PER_PFLOP = 1e6  # nominal (real compute costs ~$0.01/PFLOP): puts a typical run at ~$10 (see the docstring)
EVALS_PER_RUN = (20, 40)  # evaluations per run, drawn per run
KIND_COUNTS = {"scratch": 150, "scratch-hard": 120, "ssl": 130}
# --late-step: this many runs of each kind, all with the late-step schedule, from their own seed.
LATE_STEP_COUNTS = {"scratch": 40, "ssl": 40}
# --pairs: runs on the 100-class pairs task, from their own seed; pairs per split (train from the train images).
PAIRS_COUNTS = {"pairs": 120}
PAIRS_PER_SPLIT = {"train": 6000, "val": 1000}
# Pairs runs see 5x the examples of twice the size: a quarter of the nominal price puts the mean run at about $18
# (median $5), near the issue's $23.7 plan, so that prices per point read alike.
PAIRS_USD_PER_PFLOP = USD_PER_PFLOP / 4


# ---------------------------------------------------------------------- data
def digits_splits(hard: bool, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val): 8x8 images in [0, 1], a fixed 2/3-1/3 split."""
    data = load_digits()
    x = data.images.astype(np.float32) / 16.0
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # the same split for every run
    x, y = x[order], y[order]
    if hard:
        x = _shift(x, rng, 1) + rng.normal(0.0, 0.2, x.shape).astype(np.float32)
    n_train = 1200
    y_train = y[:n_train].copy()
    if hard:
        wrong = rng.random(n_train) < 0.1
        y_train[wrong] = rng.integers(0, 10, int(wrong.sum()))
    t = torch.from_numpy
    return t(x[:n_train, None]), t(y_train), t(x[n_train:, None]), t(y[n_train:])


def pairs_splits(rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val) of the pairs task: two 8x8 digits side by side, label 10 a + b.

    The digits are the harder version's (shifted, noisy, 10% of the training labels wrong); training pairs
    are drawn from the training images only and validation pairs from the others.
    """
    x_train, y_train, x_val, y_val = digits_splits(True, rng)
    out = []
    for x, y, n in ((x_train, y_train, PAIRS_PER_SPLIT["train"]), (x_val, y_val, PAIRS_PER_SPLIT["val"])):
        a, b = (torch.from_numpy(rng.integers(0, len(y), n)) for _ in range(2))
        out += [torch.cat([x[a], x[b]], dim=3), 10 * y[a] + y[b]]
    return tuple(out)


def _shift(x: np.ndarray, rng: np.random.Generator, most: int) -> np.ndarray:
    out = np.zeros_like(x)
    for i in range(len(x)):
        dy, dx = rng.integers(-most, most + 1, 2)
        out[i] = np.roll(np.roll(x[i], dy, axis=0), dx, axis=1)
    return out


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """SimCLR-style view of 8x8 digits: random shift, pixel dropout, contrast and noise."""
    n = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    v = pad[:, :, dy:dy + 8, dx:dx + 8]
    keep = (torch.rand(v.shape, generator=gen) > 0.2).float()
    scale = 0.6 + 0.8 * torch.rand((n, 1, 1, 1), generator=gen)
    return v * keep * scale + 0.1 * torch.randn(v.shape, generator=gen)


# ---------------------------------------------------------------------- models
def encoder(arch: str, width: int, depth: int, image_width: int = 8) -> tuple[nn.Module, int]:
    """An MLP or a small CNN on 1x8x8 images (1x8x16 for pairs); returns (module, feature size)."""
    if arch == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        size = 8 * image_width
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        return nn.Sequential(*layers), size
    layers = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    layers += [nn.MaxPool2d(2), nn.Flatten()]
    return nn.Sequential(*layers), width * 2 * image_width


def train_flops_per_example(model: nn.Module, example: torch.Tensor) -> float:
    """Forward FLOPs of one example x 3 (forward + backward)."""
    with FlopCounterMode(display=False) as counter:
        model(example)
    return 3.0 * counter.get_total_flops() / example.shape[0]


# ---------------------------------------------------------------------- schedules
def lr_at(schedule: str, step: int, total: int, peak: float) -> float:
    """Learning rate at ``step`` of ``total`` for the named schedule (peak = the base LR)."""
    t = step / max(total, 1)
    if schedule == "onecycle":  # torch's OneCycleLR shape: 30% cosine warmup from peak/25, anneal to ~0
        if t < 0.3:
            return peak / 25 + (peak - peak / 25) * (1 - math.cos(math.pi * t / 0.3)) / 2
        return peak * 1e-4 + (peak - peak * 1e-4) * (1 + math.cos(math.pi * (t - 0.3) / 0.7)) / 2
    if schedule == "cosine":  # 5% linear warmup, then cosine to 0
        if t < 0.05:
            return peak * (t / 0.05)
        return peak * (1 + math.cos(math.pi * (t - 0.05) / 0.95)) / 2
    if schedule == "step":  # x0.1 at 50% and 75%
        return peak * (0.1 ** int(t >= 0.5)) * (0.1 ** int(t >= 0.75))
    if schedule == "late-step":  # x0.1 at 80% (--late-step): a high-LR plateau past half the plan
        return peak * (0.1 ** int(t >= 0.8))
    return peak  # constant


# ---------------------------------------------------------------------- runs
def draw_config(kind: str, rng: np.random.Generator) -> dict:
    arch = str(rng.choice(["mlp", "cnn"], p=[0.55, 0.45]))
    width = int(rng.choice([16, 32, 64, 128] if arch == "mlp" else [4, 8, 16]))
    optimizer = str(rng.choice(["sgd", "adamw"]))
    low, high = (1e-3, 1.0) if optimizer == "sgd" else (1e-4, 0.03)
    return {
        "kind": kind, "arch": arch, "width": width, "depth": int(rng.integers(1, 4)),
        "optimizer": optimizer, "lr": float(math.exp(rng.uniform(math.log(low), math.log(high)))),
        "schedule": str(rng.choice(["onecycle", "cosine", "step", "constant"], p=[0.3, 0.3, 0.25, 0.15])),
        "batch_size": int(rng.choice([32, 64, 128])), "epochs": int(rng.integers(8, 41)),
        "weight_decay": float(rng.choice([0.0, 1e-4, 5e-4])),
        "evals": int(rng.integers(EVALS_PER_RUN[0], EVALS_PER_RUN[1] + 1)),
        "temperature": float(rng.choice([0.1, 0.2, 0.5])) if kind == "ssl" else None,
    }


def run_one(config: dict, data: tuple, seed: int, usd_per_pflop: float = USD_PER_PFLOP) -> dict:
    """Trains one run; returns its generic-JSONL record."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train, x_val, y_val = data
    ssl = config["kind"] == "ssl"
    classes = int(torch.cat([y_train, y_val]).max()) + 1  # 10 digits, or 100 pairs of them
    body, feat = encoder(config["arch"], config["width"], config["depth"], x_train.shape[-1])
    head = nn.Sequential(nn.Linear(feat, 64), nn.ReLU(), nn.Linear(64, 32)) if ssl else nn.Linear(feat, classes)
    probe = nn.Linear(feat, 10) if ssl else None
    params = list(body.parameters()) + list(head.parameters())
    if config["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"])
    else:
        opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"] or 1e-2)
    probe_opt = torch.optim.Adam(probe.parameters(), lr=1e-2) if ssl else None
    model = nn.Sequential(body, head)
    per_example = train_flops_per_example(model, x_train[:4]) * (2 if ssl else 1)
    if ssl:
        per_example += train_flops_per_example(probe, torch.zeros(4, feat))
    usd_per_example = per_example / 1e15 * usd_per_pflop
    n, bs = len(y_train), config["batch_size"]
    steps_per_epoch = math.ceil(n / bs)
    total = config["epochs"] * steps_per_epoch
    eval_at = set(np.unique(np.linspace(0, total, config["evals"] + 1)[1:].round().astype(int)).tolist())
    points, spent, step = [], 0.0, 0
    for _ in range(config["epochs"]):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            lr = lr_at(config["schedule"], step, total, config["lr"])
            for group in opt.param_groups:
                group["lr"] = lr
            xb, yb = x_train[idx], y_train[idx]
            if ssl:
                v1, v2 = augment(xb, gen), augment(xb, gen)
                f1, f2 = body(v1), body(v2)
                loss = nt_xent(head(f1), head(f2), config["temperature"])
                probe_loss = F.cross_entropy(probe(f1.detach()), yb)
                probe_opt.zero_grad()
                probe_loss.backward()
                probe_opt.step()
            else:
                loss = F.cross_entropy(head(body(xb)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            spent += usd_per_example * len(idx)
            step += 1
            if step in eval_at:
                acc = evaluate(body, probe if ssl else head, x_val, y_val)
                points.append([round(spent, 6), acc, float(f"{lr:.4g}")])
    baseline = float(torch.bincount(y_val).max()) / len(y_val)
    return {"planned_cost_usd": round(usd_per_example * n * config["epochs"], 6), "baseline": round(baseline, 6),
            "points": points}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalized-temperature cross-entropy over the 2n views of a batch."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


@torch.no_grad()
def evaluate(body: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    logits = head(body(x))
    if not torch.isfinite(logits).all():
        return None  # diverged: written as null, the replay's NaN
    return round(float((logits.argmax(1) == y).float().mean()), 5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "curves" / "digits.jsonl")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of runs of each kind")
    parser.add_argument("--pairs", action="store_true",
                        help="instead: from-scratch runs on the 100-class pairs task (kind 'pairs'; replay_curves.py's "
                             "digits-pairs set)")
    parser.add_argument("--late-step", action="store_true",
                        help="instead: scratch and SSL runs whose learning rate drops x0.1 at 80%% of the plan only "
                             "(kind 'late-step'; replay_curves.py's digits-late-step set)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED + 7 if args.late_step else SEED + 11 if args.pairs else SEED)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    datasets = {hard: digits_splits(hard, np.random.default_rng(SEED + 1)) for hard in (False, True)}
    if args.pairs:
        datasets[False] = pairs_splits(np.random.default_rng(SEED + 1))
    counts = LATE_STEP_COUNTS if args.late_step else PAIRS_COUNTS if args.pairs else KIND_COUNTS
    with open(args.out, "w") as f:
        for kind, count in counts.items():
            for i in range(max(1, round(count * args.scale))):
                config = draw_config(kind, rng)
                if args.late_step:
                    config["schedule"] = "late-step"
                seed = int(rng.integers(2**31))
                t1 = time.time()
                record = run_one(config, datasets[kind == "scratch-hard"], seed,
                                 PAIRS_USD_PER_PFLOP if args.pairs else USD_PER_PFLOP)
                name = f"late-step-{kind}" if args.late_step else kind
                record = {"id": f"{name}-{i:03d}", "mode": "max", **record,
                          "kind": "late-step" if args.late_step else kind,
                          "anneals": config["schedule"] != "constant",  # as MarginalGainStopping sets it
                          "config": {k: v for k, v in config.items() if v is not None}}
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
                f.flush()
                last = record["points"][-1][1]
                print(f"{record['id']} {config['arch']}{config['width']}x{config['depth']} {config['optimizer']} "
                      f"{config['schedule']} lr={config['lr']:.3g} final={last} {time.time() - t1:.1f}s "
                      f"(total {time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
