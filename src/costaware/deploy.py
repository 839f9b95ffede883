"""The model's life after training: what serving it costs, and which model to deploy.

A model that is cheap to train can be dear to serve, and the other way round: a distilled
student costs dollars to train and saves dollars on every request. :class:`Deployment` states
the expected serving load and price; :func:`measure_serving` times a candidate on the serving
device at the serving batch size; :func:`serving_cost` turns the timing into dollars per 1,000
requests, lifetime dollars (training + serving) and value (metric points x ``usd_per_point``
minus lifetime dollars); :func:`recommend` picks the candidate of highest value that meets the
latency SLA, and says why.

The serving arithmetic assumes a server kept busy: dollars per request = seconds per example x
``usd_per_hour`` / 3600. Idle capacity, autoscaling and networking are not counted; they cost
every candidate alike.

Example::

    from costaware.deploy import Deployment, measure_serving, serving_cost, recommend

    deployment = Deployment(requests=5_000_000, usd_per_hour=0.05, usd_per_point=20.0)
    timing = measure_serving(model, examples, lambda m, batch: m(**batch), deployment)
    cost = serving_cost("student", timing, deployment, train_usd=0.012, metric=0.83)
    print(cost.usd_per_1k_requests, cost.lifetime_usd, cost.value_usd)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from costaware._torch import device_of
from costaware.validation import check_amount, check_count

#: ``forward(model, batch)``: one inference call on a batch of the serving batch size.
ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class Deployment:
    """How a model will serve, once trained.

    Attributes:
        requests: requests (examples) the model will serve over its life.
        usd_per_hour: what one serving instance costs per hour, dollars: the share of a machine
            that runs one copy of the model with ``threads`` CPU threads (or one GPU).
        device: the serving device, ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        batch_size: requests served together (1: one request at a time).
        sla_ms: the most a request may wait for its batch to compute, milliseconds (the 95th
            percentile of measured batch times is compared); None: no SLA.
        threads: torch CPU threads while timing (what one serving instance has); None: leave
            the current setting.
        usd_per_point: what one point of the metric (0.01 with the policy's default
            ``points_per_unit``, 100) is worth over the model's life, dollars; None: the stopping
            policy's ``usd_per_point``.
        examples: validation examples timed (spread over the validation set).
        repeats: timed passes over them; each batch counts its fastest pass.

    Raises:
        ValueError: at construction, naming the argument.
    """

    requests: int
    usd_per_hour: float
    device: str = "cpu"
    batch_size: int = 1
    sla_ms: Optional[float] = None
    threads: Optional[int] = 1
    usd_per_point: Optional[float] = None
    examples: int = 64
    repeats: int = 3

    def __post_init__(self) -> None:
        check_count("requests", self.requests, minimum=1)
        check_amount("usd_per_hour", self.usd_per_hour, why=" (dollars per hour of one serving instance)")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        check_count("batch_size", self.batch_size, minimum=1)
        check_amount("sla_ms", self.sla_ms, allow_none=True, strict=True)
        check_count("threads", self.threads, minimum=1, allow_none=True)
        check_amount("usd_per_point", self.usd_per_point, allow_none=True)
        check_count("examples", self.examples, minimum=1)
        check_count("repeats", self.repeats, minimum=1)


@dataclass
class ServingTiming:
    """A candidate timed on the serving device.

    Attributes:
        latency_ms_per_example: milliseconds of compute per example at the serving batch size.
        request_p95_ms: 95th percentile of the time one batch takes, milliseconds (what a
            request waits, queueing aside).
        throughput_per_s: examples per second one serving instance sustains.
        examples: examples timed.
        device: where.
        batch_size: how many at a time.
    """

    latency_ms_per_example: float
    request_p95_ms: float
    throughput_per_s: float
    examples: int
    device: str
    batch_size: int


@dataclass
class ServingCost:
    """One candidate's life: training, serving, and what it is worth.

    Attributes:
        role: ``"teacher"``, ``"student"``, ``"quantized"``.
        metric: the monitored metric on the validation set.
        latency_ms_per_example: as :class:`ServingTiming`.
        request_p95_ms: as :class:`ServingTiming`.
        throughput_per_s: as :class:`ServingTiming`.
        usd_per_1k_requests: serving dollars per 1,000 requests.
        serving_usd: serving dollars over ``Deployment.requests``.
        train_usd: every training dollar this candidate needed (a student's includes its
            teacher's, a quantized model's its float model's and the quantization's).
        lifetime_usd: ``train_usd + serving_usd``.
        value_usd: metric points x ``usd_per_point`` - ``lifetime_usd`` (points are the policy's
            ``points_per_unit``, 100 by default, x the metric, negated for a metric to minimise);
            None without a price per point or a metric.
        meets_sla: whether ``request_p95_ms <= sla_ms`` (True without an SLA).
    """

    role: str
    metric: Optional[float]
    latency_ms_per_example: float
    request_p95_ms: float
    throughput_per_s: float
    usd_per_1k_requests: float
    serving_usd: float
    train_usd: float
    lifetime_usd: float
    value_usd: Optional[float]
    meets_sla: bool

    def to_fields(self, prefix: str = "") -> dict:
        """Flat, unit-named fields for a ledger event."""
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def serving_examples(loader: Optional[Iterable], count: int, max_batches: int = 256) -> list:
    """``count`` single-example batches spread evenly over ``loader`` (on the CPU).

    Evaluation loaders are often sorted by length: the first examples would be the shortest,
    so examples are drawn across the whole loader (at most ``max_batches`` batches read).
    """
    if loader is None:
        return []
    singles: list = []
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        singles += [slice_batch(batch, i, i + 1) for i in range(batch_size_of(batch))]
    if len(singles) <= count:
        return singles
    step = len(singles) / count
    return [singles[int(i * step)] for i in range(count)]


def measure_serving(model: nn.Module, examples: Sequence[Any], forward: ForwardFn,
                    deployment: Deployment) -> Optional[ServingTiming]:
    """Time one model: :func:`measure_serving_many` with one candidate."""
    return measure_serving_many({"model": model}, examples, forward, deployment).get("model")


def measure_serving_many(models: dict[str, nn.Module], examples: Sequence[Any], forward: ForwardFn,
                         deployment: Deployment) -> dict[str, ServingTiming]:
    """Time ``forward`` on ``examples`` regrouped into batches of ``deployment.batch_size``.

    One untimed warm-up pass per model, then ``deployment.repeats`` rounds in which every model
    is timed in turn (interleaved, so that other work on the machine slows them alike); each
    batch counts its fastest round. The models run in eval mode on the serving device, with
    ``deployment.threads`` CPU threads, and are put back on their devices and in their modes.
    Returns nothing without examples.
    """
    if not examples or not models:
        return {}
    device = torch.device(deployment.device)
    batches = [to_device(b, device) for b in group_examples(examples, deployment.batch_size)]
    best = {name: [math.inf] * len(batches) for name in models}
    before_threads = torch.get_num_threads()
    try:
        if deployment.threads is not None:
            torch.set_num_threads(deployment.threads)
        for round_ in range(deployment.repeats + 1):  # round 0: warm-up (allocations, weight packing)
            for name, model in models.items():
                seconds = _on_device(model, device, lambda m: _batch_seconds(m, batches, forward, device))
                if round_:
                    best[name] = [min(a, b) for a, b in zip(best[name], seconds)]
    finally:
        torch.set_num_threads(before_threads)
    return {name: _timing(seconds, len(examples), device, deployment.batch_size) for name, seconds in best.items()}


def _on_device(model: nn.Module, device: torch.device, work: Callable[[nn.Module], Any]) -> Any:
    """``work(model)`` with the model in eval mode on ``device``; its place and modes put back."""
    place = device_of(model)
    modes = {m: m.training for m in model.modules()}
    if place != device:  # (a quantized CPU model is never moved: bitsandbytes re-packs on a move)
        model.to(device)
    model.eval()
    try:
        return work(model)
    finally:
        if place != device:
            model.to(place)
        for m, training in modes.items():
            m.training = training


@torch.no_grad()
def _batch_seconds(model: nn.Module, batches: list, forward: ForwardFn, device: torch.device) -> list[float]:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = []
    for batch in batches:
        start = time.perf_counter()
        forward(model, batch)
        synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def _timing(best_s: list[float], examples: int, device: torch.device, batch_size: int) -> ServingTiming:
    per_example_ms = 1000.0 * sum(best_s) / examples
    ordered = sorted(best_s)
    p95_ms = 1000.0 * ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return ServingTiming(latency_ms_per_example=per_example_ms, request_p95_ms=p95_ms,
                         throughput_per_s=1000.0 / per_example_ms if per_example_ms > 0 else math.inf,
                         examples=examples, device=str(device), batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# Dollars and value
# ----------------------------------------------------------------------------------------------


def serving_cost(role: str, timing: ServingTiming, deployment: Deployment, train_usd: float,
                 metric: Optional[float], mode: str = "max",
                 usd_per_point: Optional[float] = None, points_per_unit: float = 100.0) -> ServingCost:
    """Serving and lifetime dollars of a timed candidate, and its value.

    ``usd_per_point`` is used when ``deployment.usd_per_point`` is None; a point is
    ``1 / points_per_unit`` of the metric, as the stopping policy counts it.
    """
    usd_per_1k = timing.latency_ms_per_example * deployment.usd_per_hour / 3600.0  # 1000 x ms / 1000 = s
    serving_usd = usd_per_1k * deployment.requests / 1000.0
    lifetime_usd = train_usd + serving_usd
    price = deployment.usd_per_point if deployment.usd_per_point is not None else usd_per_point
    value = None
    if price is not None and metric is not None and math.isfinite(metric):
        points = points_per_unit * metric if mode == "max" else -points_per_unit * metric
        value = points * price - lifetime_usd
    meets_sla = deployment.sla_ms is None or timing.request_p95_ms <= deployment.sla_ms
    return ServingCost(role=role, metric=metric, latency_ms_per_example=timing.latency_ms_per_example,
                       request_p95_ms=timing.request_p95_ms, throughput_per_s=timing.throughput_per_s,
                       usd_per_1k_requests=usd_per_1k, serving_usd=serving_usd, train_usd=train_usd,
                       lifetime_usd=lifetime_usd, value_usd=value, meets_sla=meets_sla)


def recommend(costs: Sequence[ServingCost], deployment: Deployment) -> tuple[Optional[str], str]:
    """``(role, reason)``: the candidate of highest value among those that meet the SLA.

    Without values (no price per point), the one of lowest lifetime dollars among those whose
    metric equals the best metric. None when no candidate meets the SLA.
    """
    feasible = [c for c in costs if c.meets_sla]
    if not feasible:
        slowest = min(costs, key=lambda c: c.request_p95_ms, default=None)
        fastest = f" (fastest: {slowest.role}, {slowest.request_p95_ms:.3g} ms)" if slowest else ""
        return None, f"no candidate meets the{_sla(deployment)} SLA{fastest}"
    valued = [c for c in feasible if c.value_usd is not None]
    if valued:
        best = max(valued, key=lambda c: c.value_usd)  # type: ignore[arg-type, return-value]
        others = [c for c in valued if c is not best]
        runner = max(others, key=lambda c: c.value_usd, default=None)  # type: ignore[arg-type, return-value]
        reason = f"{best.role}: highest value ${best.value_usd:,.4g}"
        if runner is not None:
            reason += (f", ${best.value_usd - runner.value_usd:,.4g} more than the {runner.role} "  # type: ignore[operator]
                       f"({_difference(best, runner)})")
    else:
        metrics = [c.metric for c in feasible if c.metric is not None]
        top = max(metrics) if metrics else None
        pool = [c for c in feasible if c.metric == top] or feasible
        best = min(pool, key=lambda c: c.lifetime_usd)
        reason = f"{best.role}: lowest lifetime ${best.lifetime_usd:,.4g} at the best metric (no usd_per_point given)"
    dropped = [c.role for c in costs if not c.meets_sla]
    if dropped:
        reason += f"; over the{_sla(deployment)} SLA: {', '.join(dropped)}"
    return best.role, reason


def _sla(deployment: Deployment) -> str:
    return f" {deployment.sla_ms:g} ms" if deployment.sla_ms is not None else ""


def _difference(best: ServingCost, other: ServingCost) -> str:
    parts = []
    if best.metric is not None and other.metric is not None:
        parts.append(f"metric {best.metric - other.metric:+.4g}")
    parts.append(f"lifetime {best.lifetime_usd - other.lifetime_usd:+,.4g} $")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Batches: slicing, regrouping, moving
# ----------------------------------------------------------------------------------------------


def batch_size_of(batch: Any) -> int:
    """Examples in a batch: the first dimension of its first tensor (1 if none)."""
    for value in _tensors(batch):
        if value.dim() > 0:
            return int(value.shape[0])
    return 1


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in a (nested) batch.

    A dict with an ``attention_mask`` of shape ``(batch, length)`` is also cut to the longest
    sequence left, so that one example is served without the padding its batch needed.
    """
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        rows = {k: slice_batch(v, start, stop) for k, v in batch.items()}
        mask = rows.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel():
            length = int(mask.sum(dim=1).max())
            width = mask.shape[1]
            rows = {k: v[:, :length] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == width else v
                    for k, v in rows.items()}
        return rows
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, start, stop) for v in batch)
    return batch


def group_examples(examples: Sequence[Any], batch_size: int) -> list:
    """Single-example batches regrouped ``batch_size`` at a time (padded with zeros where lengths differ)."""
    return [_concat(list(examples[i:i + batch_size])) for i in range(0, len(examples), batch_size)]


def _concat(parts: list) -> Any:
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        if first.dim() >= 2 and len({p.shape[1:] for p in parts}) > 1:
            width = max(p.shape[1] for p in parts)
            parts = [nn.functional.pad(p, (0, width - p.shape[1])) if p.dim() == 2 else p for p in parts]
        return torch.cat(parts) if first.dim() > 0 else first
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return first


def _tensors(batch: Any) -> Iterable[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from _tensors(value)


def to_device(value: Any, device: Any) -> Any:
    """Move the tensors of a (nested) batch to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value
