"""LoRA on SST-2, stopped by marginal gain, distilled into a small student, then quantized.

The teacher is the LoRA-adapted MiniLM of ``examples/lora_sst2.py`` (the packaged
``all-MiniLM-L6-v2``, 22.7M parameters, of which 0.3% train). ``costaware.MarginalGainStopping``
watches its validation accuracy against the dollars spent and stops once the next stretch of
training is worth less than it costs, at ``--usd-per-point`` dollars per point (0.01) of
accuracy; the best teacher weights are restored. ``costaware.strategies.Distill`` then trains
a ``TruncatedStudent(layers=1)``: a copy of the trained teacher (LoRA merged) with the first of
MiniLM's 6 layers, fully fine-tuned on the teacher's soft targets (T=2) over the
training phrases and ``--unlabelled-samples`` more unlabelled phrases of SST-2's training file,
within what is left of ``--max-usd`` if given. ``costaware.strategies.Quantize`` then tries
bitsandbytes and torch's dynamic int8 on the student, and keeps the better one only if accuracy
drops by at most ``--max-drop`` and it is faster. Last, with the serving load
(``--requests`` at ``--serving-usd-per-hour``, batch 1, one thread), each model's serving dollars
per 1,000 requests, lifetime dollars and value are measured and the model to deploy is marked.

It prints teacher / student / quantized: validation and test accuracy, parameters, size on disk,
CPU latency per example (batch 1, one thread, what a single-request server sees), training
cost, serving and lifetime dollars, and where the ledger is (``costaware report`` renders it);
``--json FILE`` writes the same figures. Offline: the data is read from ``../shared/data/sst2``
next to the checkout (``--data-dir``).

Prices: on a CPU, dollars are host-hours times ``--usd-per-host-hour`` (default $0.10, an example
of the order of a small cloud CPU instance, not a quote). ``--usd-per-point`` is what one point of
validation accuracy is worth to you; its default, $0.0002, is scaled to this toy run (which costs
a sixth of a cent a minute): $0.0002 is 7 s of this machine, so the teacher stops once its next
stretch of training is not expected to buy a point per 7 s. On a real run, price a point in real
money (``--usd-per-point 5``).

Example::

    python examples/marginal_gain_sst2.py --json summary.json     # under 10 minutes on 2 shared CPU cores
    python examples/marginal_gain_sst2.py --usd-per-point 0.005 --max-epochs 3   # worth more: trains longer
    python examples/marginal_gain_sst2.py --max-usd 0.015     # one budget: the student gets what the teacher left
"""

from __future__ import annotations

import time

_STARTED_S = time.monotonic()  # the summary's wall time counts imports and model loading too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see lora_sst2.py)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/data.py and lora_sst2.py

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402

import costaware  # noqa: E402
from costaware.deploy import Deployment  # noqa: E402
from costaware.report import build_report, summary_lines  # noqa: E402
from costaware.strategies import Distill, ModelRow, Quantize, TruncatedStudent  # noqa: E402
from data import HelpFormatter, read_splits, read_unlabelled, sst2_dir_or_exit, sst2_loader  # noqa: E402
from lora_sst2 import SST2Classifier, lora_encoder, model_dir  # noqa: E402

warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*have no logger configured.*")  # the student's fit logs nowhere


@torch.no_grad()
def accuracy(model: nn.Module, loader: Any) -> float:
    """Test accuracy of any of the three models (teacher, student, quantized) on CPU."""
    was_training = model.training
    model.eval()
    correct = examples = 0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
        examples += len(batch["labels"])
    model.train(was_training)
    return correct / max(examples, 1)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=None, help="folder with SST-2 train.tsv, dev.tsv, test.tsv")
    data.add_argument("--train-samples", type=int, default=3000, help="random training phrases from train.tsv")
    data.add_argument("--val-samples", type=int, default=300, help="random validation phrases from dev.tsv")
    data.add_argument("--test-samples", type=int, default=None, help="test sentences (default: all 872)")
    data.add_argument("--batch-size", type=int, default=32)
    teacher = p.add_argument_group("teacher (LoRA MiniLM)")
    teacher.add_argument("--max-epochs", type=int, default=2, help="the teacher's plan, if never stopped")
    teacher.add_argument("--val-check-interval", type=int, default=10,
                         help="validate every this many steps: each validation is a point of the cost curve")
    teacher.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate")
    teacher.add_argument("--head-lr", type=float, default=2e-3)
    stop = p.add_argument_group("stopping (costaware.MarginalGainStopping)")
    stop.add_argument("--usd-per-point", type=float, default=0.0002,
                      help="dollars one point (0.01) of validation accuracy is worth; scaled to this toy run")
    stop.add_argument("--confidence", type=float, default=0.8)
    stop.add_argument("--max-usd", type=float, default=None,
                      help="a budget for teacher and student together (costaware.BudgetCap)")
    student = p.add_argument_group("student (costaware.strategies.Distill, Quantize)")
    student.add_argument("--student-layers", type=int, default=1,
                         help="transformer layers the student keeps (of 6): 1 is 5x faster than the teacher, 2 only "
                              "2.8x (embeddings and pooling cost the same)")
    student.add_argument("--unlabelled-samples", type=int, default=6000,
                         help="unlabelled training phrases the student also learns the teacher's soft targets on")
    student.add_argument("--student-epochs", type=int, default=1)
    student.add_argument("--student-lr", type=float, default=2e-4, help="peak learning rate (warm-up, linear decay)")
    student.add_argument("--temperature", type=float, default=2.0)
    student.add_argument("--alpha", type=float, default=0.5, help="weight of the soft targets (1 - alpha: labels)")
    student.add_argument("--no-quantize", action="store_true", help="skip the int8 quantization of the student")
    student.add_argument("--max-drop", type=float, default=0.01, help="accuracy the quantized student may lose")
    serve = p.add_argument_group("serving (costaware.deploy.Deployment: batch 1, one CPU thread)")
    serve.add_argument("--requests", type=int, default=10_000_000, help="requests the model will serve in its life")
    serve.add_argument("--serving-usd-per-hour", type=float, default=0.05,
                       help="what one serving thread (a vCPU) costs per hour; an EXAMPLE price, not a quote")
    serve.add_argument("--deploy-usd-per-point", type=float, default=None,
                       help="what a point of accuracy is worth over the model's life (default: --usd-per-point)")
    serve.add_argument("--usd-per-label", type=float, default=None,
                       help="what one more labelled sentence would cost: the ledger then says what the student's "
                            "dollars would have bought as labels (distill or annotate)")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--usd-per-host-hour", type=float, default=0.10,
                     help="what the machine costs per hour; an EXAMPLE price, not a quote: give your own")
    run.add_argument("--gpu", default=None, help="GPU model for prices (default: detected)")
    run.add_argument("--usd-per-gpu-hour", type=float, default=None)
    run.add_argument("--accelerator", default="auto")
    run.add_argument("--out-dir", default="runs/marginal_gain_sst2")
    run.add_argument("--no-progress-bar", action="store_true")
    run.add_argument("--json", default=None, metavar="FILE", help="also write the summary's figures to FILE")
    args = p.parse_args(argv)
    for name in ("train_samples", "val_samples", "test_samples", "batch_size", "max_epochs", "val_check_interval",
                 "student_layers", "student_epochs", "requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def majority_share(labels: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent label: what a model that learned nothing scores."""
    return max(labels.count(label) for label in set(labels)) / len(labels)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train, stop, distill, quantize, price the serving; print the table; return its figures."""
    args = parse_args(argv)
    folder = sst2_dir_or_exit(args.data_dir, "marginal_gain_sst2.py")  # before loading anything
    if args.unlabelled_samples < 0:
        raise SystemExit(f"marginal_gain_sst2.py: error: --unlabelled-samples must be >= 0, "
                         f"got {args.unlabelled_samples}")
    torch.set_num_threads(os.cpu_count() or 1)
    pl.seed_everything(args.seed, workers=True, verbose=False)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    weights = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(weights))
    train, val, test = read_splits(folder, (args.train_samples, args.val_samples, args.test_samples), args.seed)
    unlabelled = read_unlabelled(folder / "train.tsv", args.unlabelled_samples, exclude=train[0], seed=args.seed)
    loaders = {"train": sst2_loader(tokenizer, *train, batch_size=args.batch_size, shuffle=True),
               "val": sst2_loader(tokenizer, *val, batch_size=64), "test": sst2_loader(tokenizer, *test, batch_size=64),
               "unlabelled": sst2_loader(tokenizer, unlabelled, None, batch_size=args.batch_size, shuffle=True)
               if unlabelled else None}

    teacher = SST2Classifier(lora_encoder(weights), lr=args.lr, head_lr=args.head_lr)
    distill = make_distill(args, loaders["unlabelled"])
    callbacks: list = [
        costaware.CostMonitor(usd_per_host_hour=args.usd_per_host_hour, gpu=args.gpu,
                              usd_per_gpu_hour=args.usd_per_gpu_hour, country="USA"),
        costaware.MarginalGainStopping(monitor="val_acc", mode="max", usd_per_point=args.usd_per_point,
                                       confidence=args.confidence, then=distill,
                                       policy_kwargs={"baseline": majority_share(val[1])}),
    ]
    if args.max_usd is not None:
        callbacks.append(costaware.BudgetCap(max_usd=args.max_usd))
    trainer = pl.Trainer(
        max_epochs=args.max_epochs, val_check_interval=args.val_check_interval, accelerator=args.accelerator,
        devices=1, callbacks=callbacks, default_root_dir=args.out_dir, enable_checkpointing=False,
        logger=CSVLogger(args.out_dir, name="lightning_logs"), log_every_n_steps=10,
        enable_progress_bar=not args.no_progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(teacher, loaders["train"], loaders["val"])  # the student is distilled at the end of this fit

    stopping, monitor = callbacks[1], callbacks[0]
    rows: list[ModelRow] = stopping.results
    models = {"teacher": teacher, "student": distill.student}
    if distill.then and distill.then[0].kept:
        models["quantized"] = distill.then[0].model
    test_acc = {role: accuracy(model.cpu() if role != "quantized" else model, loaders["test"])
                for role, model in models.items() if model is not None}
    wall_s = time.monotonic() - _STARTED_S
    figures = summary_figures(rows, test_acc, distill, stopping, wall_s)
    print(summary(rows, test_acc, stopping, monitor, trainer, len(test[1]), wall_s, figures), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return {"rows": rows, "test_acc": test_acc, "stopped_step": stopping.stopped_step, "wall_s": wall_s,
            "ledger_path": monitor.ledger.path, "figures": figures}


def make_distill(args: argparse.Namespace, unlabelled: Optional[Any]) -> Distill:
    """The student's recipe: the teacher with fewer layers, soft targets at T=2, int8 if it is faster."""
    followers = [] if args.no_quantize else [Quantize(bits=8, max_drop=args.max_drop, objective="latency")]
    deployment = Deployment(requests=args.requests, usd_per_hour=args.serving_usd_per_hour, device="cpu",
                            batch_size=1, threads=1, usd_per_point=args.deploy_usd_per_point)
    return Distill(TruncatedStudent(layers=args.student_layers), temperature=args.temperature, alpha=args.alpha,
                   max_epochs=args.student_epochs, lr=args.student_lr, warmup_fraction=0.1, weight_decay=0.01,
                   unlabelled_dataloader=unlabelled, then=followers, deployment=deployment, latency_threads=1,
                   usd_per_label=args.usd_per_label)


def summary_figures(rows: list[ModelRow], test_acc: dict, distill: Distill, stopping: Any, wall_s: float) -> dict:
    """What ``--json`` writes: per model, the test accuracy, serving latency (batch 1, one thread) and dollars."""
    judge = distill.judge
    figures: dict[str, Any] = {}
    for row in rows:
        candidate = judge.candidates.get(row.role) if judge is not None else None
        timing = candidate.timing if candidate is not None else None
        figures[row.role] = {
            "val_acc": row.metric, "test_acc": test_acc.get(row.role), "params": row.params,
            "size_bytes": row.size_bytes,
            "latency_ms_per_example": timing.latency_ms_per_example if timing else row.latency_ms_per_example,
            "train_usd": row.train_usd, "chain_train_usd": candidate.train_usd if candidate is not None else None,
            "usd_per_1k_requests": row.usd_per_1k_requests, "lifetime_usd": row.lifetime_usd,
            "value_usd": row.value_usd, "note": row.note,
        }
    figures["deploy"] = judge.recommended if judge is not None else None
    figures["deploy_reason"] = judge.reason if judge is not None else None
    figures["deployment"] = vars(distill.deployment) if distill.deployment is not None else None
    figures["stopped_step"] = stopping.stopped_step
    figures["wall_s"] = wall_s
    return figures


def summary(rows: list[ModelRow], test_acc: dict, stopping: Any, monitor: Any, trainer: Any, n_test: int,
            wall_s: float, figures: dict) -> str:
    """The printed table: accuracy, size, serving latency and dollars, and the model to deploy."""
    head = ("model", "val acc", f"test acc ({n_test})", "params", "size", "ms/example (batch 1, 1 thread)",
            "train $", "serve $/1k req", "lifetime $", "value $")
    table = [head]
    for row in rows:
        f = figures.get(row.role, {})
        table.append((row.role + (" *" if row.deploy else ""), _fmt(row.metric, ".4f"),
                      _fmt(test_acc.get(row.role), ".4f"),
                      _fmt(row.params, ","), _fmt(row.size_bytes and row.size_bytes / 2**20, ".2f", " MiB"),
                      _fmt(f.get("latency_ms_per_example"), ".3f"), _fmt(row.train_usd, ".6f"),
                      _fmt(row.usd_per_1k_requests, ".3g"), _fmt(row.lifetime_usd, ".4g"), _fmt(row.value_usd, ".4g")))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    notes = [f"  {row.role}: {row.note}" for row in rows if row.note]
    stop = (f"stopped at step {stopping.stopped_step}: {stopping.stop_reason}" if stopping.stopped_step is not None
            else f"not stopped by marginal gain: the plan ended at step {trainer.global_step}")
    total = sum(r.train_usd or 0.0 for r in rows if r.role in ("teacher", "student"))
    deployment = figures.get("deployment") or {}
    # The run's ending, totals and phases, worded as the report and `costaware report` word them.
    run_lines = summary_lines(build_report(monitor.ledger.path)) if monitor.ledger.path else ["no ledger written"]
    return "\n".join([
        "\n== LoRA MiniLM on SST-2: stopped by marginal gain, distilled, quantized ==",
        f"teacher       : {stop}",
        *run_lines,
        *lines,
        "notes:", *notes,
        f"deploy (*)    : {figures.get('deploy_reason')}" if figures.get("deploy_reason") else "deploy        : -",
        f"serving       : {deployment.get('requests', 0):,} requests at ${deployment.get('usd_per_hour', 0):.3g}/hour "
        "(lifetime $ = every training dollar the model needed + serving)",
        f"total         : ${total:.6f} training (teacher + student), priced at "
        f"${monitor.prices.usd_per_host_hour:.2f}/host-hour",
        f"ledger        : {monitor.ledger.path}  (costaware report {Path(monitor.ledger.path).parent.parent})",
        f"wall time     : {wall_s:.1f} s for the whole script",
    ])


def _fmt(value: Optional[float], spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


if __name__ == "__main__":
    main()
