"""Self-supervised (SimCLR) pretraining on scikit-learn's digits, watched by an online k-NN probe.

Contrastive learning has no accuracy of its own, so ``costaware.OnlineProbe`` fits a k-NN probe
(cosine, k=20) on the frozen embeddings of 500 labeled training digits at every validation and
logs its accuracy on 300 held-out digits as ``probe/acc``. ``costaware.CostMonitor`` measures
what the run spends, and ``costaware.MarginalGainStopping`` stops pretraining once a point of
probe accuracy costs more than it is worth, then quantizes the encoder to int8 with bitsandbytes
(``Quantize(bits=8, max_drop=0.02)``), keeping it only if the probe accuracy drops by at most two
points and it is at least 5% faster. The script prints teacher / quantized: probe accuracy,
parameters, size on disk, CPU latency per example and training cost. Then, if the run was stopped,
it trains the model on to the planned ``--max-epochs`` (a real counterfactual, priced by its own
CostMonitor) and says plainly whether stopping paid: the points the extra epochs bought, at
``--usd-per-point``, against their cost. A run never stopped (what the default price, a point
worth more than the whole toy run, gives) says instead what its second half bought, from the
points it recorded.

Offline: the digits ship with scikit-learn (1797 images of 8x8 pixels). The encoder is an MLP
(its linear layers are what bitsandbytes quantizes); the two views of each digit are random
shifts, small rotations and scalings, pixel noise and a masked patch.

Prices: on a CPU, dollars are host-hours times ``--usd-per-host-hour`` (default $0.10, an
example of the order of a small cloud CPU instance, not a quote). ``--usd-per-point`` is what
one point (0.01) of probe accuracy is worth to you; its default is scaled to this toy run, which
costs a fraction of a cent.

Example::

    python examples/ssl_digits.py                     # about a minute on 2 CPU cores
    python examples/ssl_digits.py --max-epochs 300 --usd-per-point 0.0001
    python examples/ssl_digits.py --bits 4            # NF4 instead of int8
"""

from __future__ import annotations

import time

_STARTED_S = time.monotonic()  # the summary's wall time counts imports too

import argparse  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import costaware  # noqa: E402
from costaware.callbacks.online_probe import knn_predict  # noqa: E402
from costaware.report import build_report, summary_lines  # noqa: E402
from costaware.report.text import usd  # noqa: E402
from costaware.strategies.base import ModelRow  # noqa: E402

# Batches come from tensors in memory: worker processes would only compete for the same cores.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def digits_splits(labeled: int = 500, held_out: int = 300, seed: int = 0) -> dict[str, tuple]:
    """scikit-learn's digits as ``(images, labels)``, pixels in [0, 1], split three ways.

    ``held_out`` digits are the probe's evaluation set (and the contrastive validation set);
    the rest is the unlabeled pretraining set, of which ``labeled`` digits also lend their
    labels to the probe.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held, rest = order[:held_out], order[held_out:]
    if labeled > len(rest):
        raise SystemExit(f"--labeled must be <= {len(rest)}, got {labeled}")
    probe_train = rest[:labeled]
    return {"pretrain": (images[rest], labels[rest]), "probe_train": (images[probe_train], labels[probe_train]),
            "held_out": (images[held], labels[held])}


def augment(images: torch.Tensor, noise_std: float = 0.1, mask_prob: float = 0.5) -> torch.Tensor:
    """A random view of each 8x8 digit: shift (up to 1.5 px), rotation (15 deg), scale, noise, a masked patch."""
    n = len(images)
    angle = (torch.rand(n) * 2 - 1) * math.radians(15)
    scale = 0.9 + 0.2 * torch.rand(n)
    shift = (torch.rand(n, 2) * 2 - 1) * (1.5 / 4)  # grid units: 2 per 8 pixels
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, 8, 8), align_corners=False)
    views = F.grid_sample(images.unsqueeze(1), grid, align_corners=False, padding_mode="zeros").squeeze(1)
    views = views + noise_std * torch.randn_like(views)
    # Cutout: a 3x3 patch at a random place, on half of the views.
    rows, cols = torch.randint(0, 6, (n,)), torch.randint(0, 6, (n,))
    r = torch.arange(8).view(1, 8, 1)
    c = torch.arange(8).view(1, 1, 8)
    patch = ((r >= rows.view(n, 1, 1)) & (r < rows.view(n, 1, 1) + 3) & (c >= cols.view(n, 1, 1))
             & (c < cols.view(n, 1, 1) + 3) & (torch.rand(n, 1, 1) < mask_prob))
    return views.masked_fill(patch, 0.0).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalized temperature-scaled cross entropy: each view must pick out its twin."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = len(z1)
    twins = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, twins)


class SimCLR(pl.LightningModule):
    """An MLP encoder of 8x8 digits trained with NT-Xent on two augmented views of each.

    ``embed`` (and ``forward``) give the encoder's output, what the probe and the quantized
    model use; the projection head serves the contrastive loss only.

    Args:
        hidden: width of the encoder's two hidden layers.
        embed_dim: the embedding's size.
        proj_dim: the projection head's output size.
        temperature: NT-Xent temperature.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.

    Example::

        model = SimCLR()
        pl.Trainer(max_epochs=50).fit(model, pretrain_loader, val_loader)
        embeddings = model.embed(images)  # (n, 64)
    """

    def __init__(self, hidden: int = 256, embed_dim: int = 64, proj_dim: int = 32, temperature: float = 0.1,
                 lr: float = 2e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, embed_dim),
        )
        self.projector = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, proj_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)

    def _loss(self, images: torch.Tensor) -> torch.Tensor:
        views = self.projector(self.embed(torch.cat([augment(images), augment(images)])))
        z1, z2 = views.chunk(2)
        return nt_xent(z1, z2, self.hparams.temperature)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch[0])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch[0]), batch_size=len(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--labeled", type=int, default=500, help="labeled training digits the probe is fitted on")
    p.add_argument("--held-out", type=int, default=300, help="held-out digits the probe is evaluated on")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-epochs", type=int, default=200,
                   help="the most pretraining epochs (the policy may stop earlier)")
    p.add_argument("--val-every", type=int, default=4, help="validate (and probe) every this many epochs")
    p.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads: one is fastest for this small MLP on a shared machine")
    p.add_argument("--out-dir", default="runs/ssl_digits", help="Trainer default_root_dir (logs, ledger, weights)")
    p.add_argument("--no-progress-bar", action="store_true")
    p.add_argument("--no-check", action="store_true",
                   help="skip training on to --max-epochs after a stop to show whether stopping paid")
    cost = p.add_argument_group("cost")
    cost.add_argument("--usd-per-host-hour", type=float, default=0.10,
                      help="what the machine costs per hour (an EXAMPLE price, not a quote: give your own)")
    cost.add_argument("--usd-per-point", type=float, default=0.001,
                      help="what one point (0.01) of probe accuracy is worth, dollars; scaled to this toy run")
    cost.add_argument("--min-points", type=int, default=8,
                      help="validations before the policy may stop (the probe often dips while training starts)")
    cost.add_argument("--prior", default="from-scratch",
                      help="what past runs say: 'from-scratch' (the shipped from-scratch and SSL runs), 'default' "
                           "(those and fine-tuning runs), or a prior JSON from `costaware prior fit`")
    cost.add_argument("--bits", type=int, default=8, choices=(8, 4), help="quantize to int8 or NF4")
    cost.add_argument("--max-drop", type=float, default=0.02,
                      help="largest probe-accuracy drop the quantized model may show")
    args = p.parse_args(argv)
    for name in ("labeled", "held_out", "batch_size", "max_epochs", "val_every", "k", "threads", "min_points"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def make_quantize(args: argparse.Namespace) -> Optional[Any]:
    """``Quantize`` if bitsandbytes is installed, else None (the run goes on without it)."""
    try:
        from costaware.strategies.quantize import Quantize
        return Quantize(bits=args.bits, max_drop=args.max_drop)
    except ImportError as err:
        print(f"no quantization: {err}", flush=True)
        return None


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Pretrain, probe, stop on marginal gain, quantize; print and return the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    data = digits_splits(args.labeled, args.held_out, args.seed)
    pretrain = DataLoader(TensorDataset(*data["pretrain"]), batch_size=args.batch_size, shuffle=True, drop_last=True)
    held_out = DataLoader(TensorDataset(*data["held_out"]), batch_size=args.batch_size)

    monitor = costaware.CostMonitor(usd_per_host_hour=args.usd_per_host_hour, country="USA")
    probe = costaware.OnlineProbe(train=data["probe_train"], val=data["held_out"], probe="knn", k=args.k)
    quantize = make_quantize(args)
    # then=None: MarginalGainStopping's default, EarlyStop (keep the best weights).
    stopping = costaware.MarginalGainStopping(monitor="probe/acc", mode="max", usd_per_point=args.usd_per_point,
                                              min_points=args.min_points, prior=args.prior, then=quantize)
    callbacks: list = [monitor, probe, stopping]
    model = SimCLR(lr=args.lr)
    trainer = pl.Trainer(max_epochs=args.max_epochs, check_val_every_n_epoch=args.val_every, accelerator="cpu",
                         devices=1, callbacks=callbacks, default_root_dir=args.out_dir,
                         logger=CSVLogger(args.out_dir, name="lightning_logs"), log_every_n_steps=5,
                         enable_progress_bar=not args.no_progress_bar, enable_model_summary=False)
    trainer.fit(model, pretrain, held_out)

    rows: list[ModelRow] = list(quantize.rows) if quantize is not None and quantize.rows else []
    if not rows:
        rows = list(stopping.results)  # EarlyStop's row, or what a failed Quantize left
    if not rows:
        rows = [ModelRow(role="teacher", metric=probe.score(model), params=sum(p.numel() for p in model.parameters()),
                         train_usd=monitor.totals.usd)]

    verdict = did_stopping_pay(args, model, data, pretrain, held_out, stopping, monitor, trainer.current_epoch)
    pixels_train, pixels_val = (data["probe_train"][0].flatten(1), data["held_out"][0].flatten(1))
    raw_acc = float((knn_predict(pixels_train, data["probe_train"][1], pixels_val, args.k)
                     == data["held_out"][1]).float().mean())
    totals = monitor.totals
    # How the run ended and what it cost, in the report's own words (what `costaware report` prints).
    run_lines = summary_lines(build_report(monitor.ledger.path)) if monitor.ledger.path else ["no ledger written"]
    wall_s = time.monotonic() - _STARTED_S
    print("\n== SimCLR on digits: summary ==")
    print(f"run           : {trainer.global_step} steps, {trainer.current_epoch} epochs")
    print("\n".join(run_lines))
    print(f"probe         : k-NN (k={args.k}, cosine) on {args.labeled} labeled digits, accuracy on {args.held_out} "
          f"held-out ones; probing took {probe.total_seconds:.2f} s, {usd(probe.total_usd)} of the run")
    print(f"raw pixels    : the same k-NN on the 64 raw pixels scores {raw_acc:.4f}")
    print(f"priced at     : ${args.usd_per_host_hour:.2f}/host-hour")
    print(f"\n{'model':<10} {'probe/acc':>9} {'params':>9} {'size on disk':>13} {'CPU ms/example':>15} "
          f"{'train $':>10}  note")
    for row in rows:
        print(f"{row.role:<10} {_fmt(row.metric, '.4f'):>9} {_fmt(row.params, ','):>9} "
              f"{_fmt(row.size_bytes and row.size_bytes / 1024, '.1f', ' KiB'):>13} "
              f"{_fmt(row.latency_ms_per_example, '.4f'):>15} {_fmt(row.train_usd, '.6f'):>10}  {row.note}")
    print(f"\ndid it pay?   : {verdict}")
    print(f"\nledger        : {monitor.ledger.path}")
    print(f"script time   : {wall_s:.1f} s for the whole script (the Wall time above is the fit's)", flush=True)
    return {"rows": rows, "totals": totals, "raw_pixel_acc": raw_acc, "probe_seconds": probe.total_seconds,
            "stopped_step": getattr(stopping, "stopped_step", None), "wall_s": wall_s,
            "ledger_path": monitor.ledger.path, "verdict": verdict}


class _ProbeRecorder(pl.Callback):
    """Keeps ``probe/acc`` after each validation (placed after the OnlineProbe that logs it)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("probe/acc")
        if value is not None and not trainer.sanity_checking:
            self.values.append(float(value))


def did_stopping_pay(args: argparse.Namespace, model: pl.LightningModule, data: dict, pretrain: DataLoader,
                     held_out: DataLoader, stopping: Any, monitor: Any, epochs_done: int) -> str:
    """Trains on to the planned end (``--max-epochs``) and says plainly whether the stop paid.

    The counterfactual is real training, not a guess: the model goes on from the weights the stop
    kept, with its own CostMonitor at the same price, and the best probe accuracy it reaches is
    priced at ``--usd-per-point`` against what the extra epochs cost.
    """
    if args.no_check:
        return "--no-check: not compared"
    if stopping.stopped_step is None or epochs_done >= args.max_epochs:
        return did_going_on_pay(args, stopping)
    best_at_stop = max(m for m in stopping.policy.state_dict()["metrics"] if math.isfinite(m))
    extra_monitor = costaware.CostMonitor(usd_per_host_hour=args.usd_per_host_hour, country="USA")
    recorder = _ProbeRecorder()
    probe = costaware.OnlineProbe(train=data["probe_train"], val=data["held_out"], probe="knn", k=args.k)
    trainer = pl.Trainer(max_epochs=args.max_epochs - epochs_done, check_val_every_n_epoch=args.val_every,
                         accelerator="cpu", devices=1, callbacks=[extra_monitor, probe, recorder],
                         default_root_dir=f"{args.out_dir}/without_stop", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, pretrain, held_out)
    best_after = max([best_at_stop] + recorder.values)
    gained_points = 100.0 * (best_after - best_at_stop)
    extra_usd = extra_monitor.totals.usd
    worth_usd = gained_points * args.usd_per_point
    paid = worth_usd < extra_usd
    return (f"training on for the other {args.max_epochs - epochs_done} planned epochs cost ${extra_usd:.6f} more and "
            f"moved the best probe accuracy from {best_at_stop:.4f} to {best_after:.4f} ({gained_points:+.2f} points, "
            f"worth ${worth_usd:.6f} at ${args.usd_per_point:g}/point): stopping "
            + (f"PAID (saved ${extra_usd - worth_usd:.6f} net)" if paid
               else f"did NOT pay (it gave up ${worth_usd - extra_usd:.6f} net)"))


def did_going_on_pay(args: argparse.Namespace, stopping: Any) -> str:
    """For a run the policy never stopped: what its second half (by cost) bought, from the recorded points.

    No counterfactual to train: the run went on, and the (cost, probe accuracy) points the policy saw
    say what a stop at half the cost would have given up, priced at ``--usd-per-point``.
    """
    state = stopping.policy.state_dict()
    points = [(c, m) for c, m in zip(state["costs_usd"], state["metrics"]) if math.isfinite(m)]
    half_usd = points[-1][0] / 2.0 if points else 0.0
    first_half = [m for c, m in points if c <= half_usd]
    if not first_half or len(first_half) == len(points):
        return "the run was not stopped, and too few validations were recorded to compare its halves"
    best_half, best_end = max(first_half), max(m for _, m in points)
    from_usd = points[len(first_half) - 1][0]
    spent_usd = points[-1][0] - from_usd
    gained_points = 100.0 * (best_end - best_half)
    worth_usd = gained_points * args.usd_per_point
    return (f"not stopped: every validation was judged worth its cost. From the last validation in the first half of "
            f"its cost (${from_usd:.6f}) on, the rest cost ${spent_usd:.6f} and moved the best probe accuracy from "
            f"{best_half:.4f} to {best_end:.4f} ({gained_points:+.2f} points, worth ${worth_usd:.6f} at "
            f"${args.usd_per_point:g}/point): going on "
            + (f"PAID (${worth_usd - spent_usd:.6f} net)" if worth_usd >= spent_usd
               else f"did NOT pay (a stop at half the cost would have saved ${spent_usd - worth_usd:.6f} net)"))


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


if __name__ == "__main__":
    main()
