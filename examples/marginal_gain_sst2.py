"""LoRA on SST-2, stopped by marginal gain, distilled into a small student, then quantized.

The teacher is the LoRA-adapted MiniLM of ``examples/lora_sst2.py`` (the packaged
``all-MiniLM-L6-v2``, 22.7M parameters, of which 0.3% train). ``costaware.MarginalGainStopping``
watches its validation accuracy against the dollars spent and stops once the next stretch of
training is worth less than it costs, at ``--usd-per-point`` dollars per point (0.01) of
accuracy; the best teacher weights are restored. ``costaware.strategies.Distill`` then trains a
bag-of-embeddings student (a 64-dimensional embedding of MiniLM's vocabulary, initialised from a
PCA of MiniLM's own token embeddings, mean and max pooling, a small MLP: about 2M parameters) on
the teacher's soft targets over the same training batches, within what is left of ``--max-usd``
if given, and ``costaware.strategies.Quantize`` (bitsandbytes, when installed) converts the
student's linear layers to int8 if its accuracy drops by at most ``--max-drop``.

It prints teacher / student / quantized: validation and test accuracy, parameters, size on disk,
CPU latency per example (one thread, what a single-request server sees) and training cost, and
where the ledger is (``costaware report`` renders it). Offline: the data is read from
``../shared/data/sst2`` next to the checkout (``--data-dir``).

Prices: on a CPU, dollars are host-hours times ``--usd-per-host-hour`` (default $0.10, an example
of the order of a small cloud CPU instance, not a quote). ``--usd-per-point`` is what one point of
validation accuracy is worth to you; its default, $0.0002, is scaled to this toy run (which costs
a sixth of a cent a minute): $0.0002 is 7 s of this machine, so the teacher stops once its next
stretch of training is not expected to buy a point per 7 s. On a real run, price a point in real
money (``--usd-per-point 5``).

Example::

    python examples/marginal_gain_sst2.py            # 6 minutes on 2 shared CPU cores (4.5 CPU-minutes)
    python examples/marginal_gain_sst2.py --usd-per-point 0.005 --max-epochs 3   # worth more: trains longer
    python examples/marginal_gain_sst2.py --max-usd 0.015     # one budget: the student gets what the teacher left
"""

from __future__ import annotations

import time

_STARTED_S = time.monotonic()  # the summary's wall time counts imports and model loading too

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/data.py and lora_sst2.py

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402

import costaware  # noqa: E402
from costaware.strategies import Distill, ModelRow  # noqa: E402
from data import read_splits, sst2_dir_or_exit, sst2_loader  # noqa: E402
from lora_sst2 import SST2Classifier, lora_encoder, model_dir  # noqa: E402

warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*have no logger configured.*")  # the student's fit logs nowhere


class BagOfEmbeddings(nn.Module):
    """The student: token embeddings, mean and max pooled over the sentence, and a small MLP.

    Called like the teacher, ``student(input_ids, attention_mask)``, and returns the same
    ``(batch, 2)`` logits, as ``Distill`` requires.

    Args:
        embeddings: ``(vocabulary, dim)`` initial token embeddings (trained further).
        hidden: width of the MLP's hidden layer.
        num_labels: output classes.
        dropout: dropout on the pooled vector.
    """

    def __init__(self, embeddings: torch.Tensor, hidden: int = 128, num_labels: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        dim = embeddings.shape[1]
        self.embed = nn.Embedding.from_pretrained(embeddings.clone(), freeze=False)
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(input_ids)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        peak = (tokens + (mask - 1.0) * 1e4).max(dim=1).values
        return self.mlp(torch.cat([mean, peak], dim=-1))


def pca_embeddings(teacher: SST2Classifier, dim: int) -> torch.Tensor:
    """MiniLM's token embeddings projected on their ``dim`` principal components, unit variance."""
    weight = teacher.encoder.get_input_embeddings().weight.detach().float()
    centered = weight - weight.mean(dim=0, keepdim=True)
    _, _, components = torch.pca_lowrank(centered, q=dim, center=False, niter=4)
    projected = centered @ components[:, :dim]
    return projected / projected.std()


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
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    student.add_argument("--student-dim", type=int, default=64, help="embedding width of the student")
    student.add_argument("--student-epochs", type=int, default=1)
    student.add_argument("--student-lr", type=float, default=5e-3)
    student.add_argument("--temperature", type=float, default=2.0)
    student.add_argument("--alpha", type=float, default=0.5, help="weight of the soft targets (1 - alpha: labels)")
    student.add_argument("--no-quantize", action="store_true", help="skip the int8 quantization of the student")
    student.add_argument("--max-drop", type=float, default=0.01, help="accuracy the quantized student may lose")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--usd-per-host-hour", type=float, default=0.10,
                     help="what the machine costs per hour; an EXAMPLE price, not a quote: give your own")
    run.add_argument("--gpu", default=None, help="GPU model for prices (default: detected)")
    run.add_argument("--usd-per-gpu-hour", type=float, default=None)
    run.add_argument("--accelerator", default="auto")
    run.add_argument("--out-dir", default="runs/marginal_gain_sst2")
    run.add_argument("--no-progress-bar", action="store_true")
    args = p.parse_args(argv)
    for name in ("train_samples", "val_samples", "test_samples", "batch_size", "max_epochs", "val_check_interval",
                 "student_dim", "student_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def majority_share(labels: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent label: what a model that learned nothing scores."""
    return max(labels.count(label) for label in set(labels)) / len(labels)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train, stop, distill, quantize; print the table; return its figures."""
    args = parse_args(argv)
    folder = sst2_dir_or_exit(args.data_dir, "marginal_gain_sst2.py")  # before loading anything
    torch.set_num_threads(os.cpu_count() or 1)
    pl.seed_everything(args.seed, workers=True, verbose=False)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    weights = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(weights))
    train, val, test = read_splits(folder, (args.train_samples, args.val_samples, args.test_samples), args.seed)
    train_loader = sst2_loader(tokenizer, *train, batch_size=args.batch_size, shuffle=True)
    val_loader = sst2_loader(tokenizer, *val, batch_size=64)
    test_loader = sst2_loader(tokenizer, *test, batch_size=64)

    teacher = SST2Classifier(lora_encoder(weights), lr=args.lr, head_lr=args.head_lr)
    student = BagOfEmbeddings(pca_embeddings(teacher, args.student_dim))
    followers = []
    quantize_cls = getattr(costaware.strategies, "Quantize", None)
    if not args.no_quantize and quantize_cls is not None:
        try:
            followers.append(quantize_cls(bits=8, max_drop=args.max_drop))
        except ImportError as err:  # bitsandbytes missing: the table has no quantized row
            print(f"(no quantization: {err})", flush=True)
    distill = Distill(student, temperature=args.temperature, alpha=args.alpha, max_epochs=args.student_epochs,
                      lr=args.student_lr, then=followers, latency_threads=1)

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
    trainer.fit(teacher, train_loader, val_loader)  # the student is distilled at the end of this fit

    stopping, monitor = callbacks[1], callbacks[0]
    rows: list[ModelRow] = stopping.results
    models = {"teacher": teacher, "student": student}
    if followers and followers[0].kept:
        models["quantized"] = followers[0].model
    test_acc = {role: accuracy(model.cpu() if role != "quantized" else model, test_loader)
                for role, model in models.items()}
    wall_s = time.monotonic() - _STARTED_S
    print(summary(rows, test_acc, stopping, monitor, trainer, len(test[1]), wall_s), flush=True)
    return {"rows": rows, "test_acc": test_acc, "stopped_step": stopping.stopped_step, "wall_s": wall_s,
            "ledger_path": monitor.ledger.path}


def summary(rows: list[ModelRow], test_acc: dict, stopping: Any, monitor: Any, trainer: Any, n_test: int,
            wall_s: float) -> str:
    head = ("model", "val acc", f"test acc ({n_test})", "params", "size", "CPU ms/example (1 thread)", "train $")
    table = [head]
    for row in rows:
        table.append((
            row.role,
            f"{row.metric:.4f}" if row.metric is not None else "-",
            f"{test_acc[row.role]:.4f}" if row.role in test_acc else "-",
            f"{row.params:,}" if row.params is not None else "-",
            f"{row.size_bytes / 2**20:.2f} MiB" if row.size_bytes is not None else "-",
            f"{row.latency_ms_per_example:.3f}" if row.latency_ms_per_example is not None else "-",
            f"{row.train_usd:.6f}" if row.train_usd is not None else "-",
        ))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    notes = [f"  {row.role}: {row.note}" for row in rows if row.note]
    stop = (f"stopped at step {stopping.stopped_step}: {stopping.stop_reason}" if stopping.stopped_step is not None
            else f"not stopped by marginal gain: the plan ended at step {trainer.global_step}")
    total = sum(r.train_usd or 0.0 for r in rows if r.role in ("teacher", "student"))
    return "\n".join([
        "\n== LoRA MiniLM on SST-2: stopped by marginal gain, distilled, quantized ==",
        f"teacher       : {stop}",
        *lines,
        "notes:", *notes,
        f"total         : ${total:.6f} (teacher + student), priced at "
        f"${monitor.prices.usd_per_host_hour:.2f}/host-hour",
        f"ledger        : {monitor.ledger.path}  (costaware report {Path(monitor.ledger.path).parent.parent})",
        f"wall time     : {wall_s:.1f} s for the whole script",
    ])


if __name__ == "__main__":
    main()
