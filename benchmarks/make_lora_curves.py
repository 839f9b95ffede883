"""Make a corpus of real LoRA fine-tuning curves on SST-2 on this machine.

Every run is real training with a plain torch loop (no Lightning, for speed): the packaged
all-MiniLM-L6-v2, frozen, with LoRA adapters on the attention's query and value projections and a
linear head (``examples/lora_sst2.py``'s model), fine-tuned on SST-2 phrases read from
``../shared/data/sst2`` (never copied here). Learning rates span 1e-4 to 3e-2 for the adapters,
three times that for the fresh head (some runs barely move, some collapse), with linear
warmup-decay (the example's), cosine, step and constant schedules, LoRA ranks 2-16, batch sizes
16 and 32, 80-200 planned steps.

The metric is accuracy on a fixed sample of 300 phrases of ``dev.tsv``, evaluated 12-18 times a
run. Cost: training compute in FLOPs, counted by ``torch.utils.flop_counter`` on the real step
the first time each padded batch shape (batch size x tokens) is seen (the frozen encoder's
backward is counted as it runs: activation gradients only), in dollars at a nominal
``USD_PER_PFLOP`` chosen so that a typical run costs about a dollar, the scale of the DeBERTa
runs in ``replay_curves.py`` (whose price grid then fits). FLOPs, unlike time on a shared
machine, are reproducible.

Nothing here is used to tune the policy or fit the shipped prior: ``replay_curves.py`` replays it
as a fine-tuning set never used for tuning.

Output: the generic JSONL of ``make_curves.py`` (points ``[cumulative_cost_usd, val_acc, lr]``,
``planned_cost_usd``, ``baseline`` = the sample's majority share, ``anneals``, ``kind`` = "lora",
``config``).

Usage::

    nice -n 10 python benchmarks/make_lora_curves.py --out benchmarks/curves/lora_sst2.jsonl   # ~100 min, 2 cores
    nice -n 10 python benchmarks/make_lora_curves.py --resume   # appends the runs a shorter corpus lacks
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing reaches the network: the model is packaged, the data local
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from data import LengthGroupedBatchSampler, PadCollate, TokenizedDataset, read_sst2, sst2_dir  # noqa: E402
from lora_sst2 import SST2Classifier, model_dir, warmup_linear_decay  # noqa: E402
from make_curves import lr_at as digits_lr_at  # noqa: E402

SEED = 20261205
RUNS = 128  # the committed corpus: 64 first, then 64 more with --resume (same draws)
USD_PER_PFLOP = 1000.0  # nominal: puts a typical run at about $1 (see the docstring)
TRAIN_POOL = 20_000  # training phrases drawn from train.tsv (every run samples its batches from them)
VAL_SAMPLES = 300  # dev.tsv phrases every evaluation scores
HEAD_LR_FACTOR = 3.0  # the fresh head learns at this multiple of the adapters' rate (the example uses ~3x)


def lr_at(schedule: str, step: int, total: int, peak: float) -> float:
    """Learning rate at ``step`` of ``total``; ``linear`` is examples/lora_sst2.py's (10% warmup, decay to 0)."""
    if schedule == "linear":
        return peak * warmup_linear_decay(step, total, 0.1)
    return digits_lr_at(schedule, step, total, peak)


def draw_config(rng: np.random.Generator) -> dict:
    return {
        "lr": float(math.exp(rng.uniform(math.log(1e-4), math.log(3e-2)))),
        "schedule": str(rng.choice(["linear", "cosine", "step", "constant"], p=[0.35, 0.3, 0.2, 0.15])),
        "rank": int(rng.choice([2, 4, 8, 16])),
        "batch_size": int(rng.choice([16, 32])),
        "steps": int(rng.integers(80, 201)),
        "evals": int(rng.integers(12, 19)),
        "weight_decay": float(rng.choice([0.0, 0.01])),
    }


_WORKER: dict = {}


def _init_worker() -> None:
    """Each worker process: one thread, the tokenizer, the base encoder and the data, loaded once."""
    torch.set_num_threads(1)
    from transformers import AutoModel, AutoTokenizer

    folder = str(model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train = read_sst2(sst2_dir() / "train.tsv", limit=TRAIN_POOL, seed=SEED)
    val = read_sst2(sst2_dir() / "dev.tsv", limit=VAL_SAMPLES, seed=SEED)
    _WORKER.update(tokenizer=tokenizer, base=AutoModel.from_pretrained(folder),
                   train=TokenizedDataset(tokenizer, *train), val=TokenizedDataset(tokenizer, *val))


def run_one(args: tuple[int, dict, int]) -> dict:
    """Trains one run; returns its generic-JSONL record."""
    index, config, seed = args
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader

    t0 = time.time()
    torch.manual_seed(seed)
    encoder = copy.deepcopy(_WORKER["base"]).train()
    encoder = get_peft_model(encoder, LoraConfig(r=config["rank"], lora_alpha=2 * config["rank"],
                                                 target_modules=["query", "value"], lora_dropout=0.1))
    model = SST2Classifier(encoder).train()
    adapters = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [{"params": adapters, "peak": config["lr"]},
              {"params": list(model.head.parameters()), "peak": HEAD_LR_FACTOR * config["lr"]}]
    opt = torch.optim.AdamW(groups, lr=config["lr"], weight_decay=config["weight_decay"])
    collate = PadCollate(_WORKER["tokenizer"].pad_token_id)
    train_set = _WORKER["train"]
    lengths = [len(ids) for ids in train_set.input_ids]
    sampler = LengthGroupedBatchSampler(lengths, config["batch_size"])
    val_loader = DataLoader(_WORKER["val"], batch_size=200, collate_fn=collate)
    total = config["steps"]
    eval_at = set(np.unique(np.linspace(0, total, config["evals"] + 1)[1:].round().astype(int)).tolist())
    flops_by_shape: dict[tuple[int, ...], float] = {}
    points: list[list] = []
    spent_flops, step, lr = 0.0, 0, config["lr"]
    while step < total:
        for batch_indices in sampler:
            if step >= total:
                break
            batch = collate([train_set[i] for i in batch_indices])
            lr = lr_at(config["schedule"], step, total, config["lr"])  # the adapters' (first group's) rate
            for group in opt.param_groups:
                group["lr"] = lr * group["peak"] / config["lr"]
            shape = tuple(batch["input_ids"].shape)
            counter = FlopCounterMode(display=False) if shape not in flops_by_shape else None
            with counter if counter is not None else contextlib.nullcontext():
                loss, _ = model._loss_and_acc(batch)
                opt.zero_grad()
                loss.backward()
            if counter is not None:
                flops_by_shape[shape] = float(counter.get_total_flops())
            opt.step()
            spent_flops += flops_by_shape[shape]
            step += 1
            if step in eval_at:
                points.append([spent_flops, evaluate(model, val_loader), float(f"{lr:.4g}")])
                model.train()
    # The plan is the planned steps' cost: the run spends exactly that (it ends at them).
    usd_per_flop = USD_PER_PFLOP / 1e15
    labels = _WORKER["val"].labels
    baseline = float(torch.bincount(labels).max()) / len(labels)
    return {
        "id": f"lora-{index:03d}", "mode": "max", "planned_cost_usd": round(spent_flops * usd_per_flop, 6),
        "baseline": round(baseline, 6),
        "points": [[round(f * usd_per_flop, 6), acc, lr_] for f, acc, lr_ in points],
        "kind": "lora", "anneals": config["schedule"] != "constant",
        "config": config, "seconds": round(time.time() - t0, 1),
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float | None:
    model.eval()
    correct, seen = 0, 0
    for batch in loader:
        logits = model(batch["input_ids"], batch["attention_mask"])
        if not torch.isfinite(logits).all():
            return None  # diverged: written as null, the replay's NaN
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        seen += len(batch["labels"])
    return round(correct / seen, 5)


def kept_runs(path: Path, jobs: list[tuple[int, dict, int]]) -> int:
    """How many runs ``path`` already holds: they must be the first of ``jobs``, in order (the same seed and
    configurations), else the corpus would mix two draws."""
    if not path.is_file():
        return 0
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if len(records) > len(jobs):
        raise SystemExit(f"{path} holds {len(records)} runs, more than --runs {len(jobs)}")
    for record, (index, config, _) in zip(records, jobs):
        if record.get("id") != f"lora-{index:03d}" or record.get("config") != config:
            raise SystemExit(f"{path}: run {record.get('id')} is not draw {index} of seed {SEED}; not resuming")
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "curves" / "lora_sst2.jsonl")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out (the first of the same draws) and append the rest")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(SEED)
    jobs = [(i, draw_config(rng), int(rng.integers(2**31))) for i in range(args.runs)]
    done = kept_runs(args.out, jobs) if args.resume else 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with multiprocessing.get_context("spawn").Pool(args.workers, initializer=_init_worker) as pool, \
            open(args.out, "a" if done else "w") as f:
        for record in pool.imap(run_one, jobs[done:]):  # in order: the file is the same whatever the workers
            seconds = record.pop("seconds")
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
            f.flush()
            c = record["config"]
            print(f"{record['id']} r={c['rank']} bs={c['batch_size']} {c['schedule']} lr={c['lr']:.3g} "
                  f"steps={c['steps']} final={record['points'][-1][1]} ${record['planned_cost_usd']:.3g} "
                  f"{seconds:.0f}s (total {time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
