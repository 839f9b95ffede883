"""Which model to deploy: teacher, student and quantized student judged by what they cost over their life.

:class:`LifetimeJudge` times every candidate on the serving device of a
:class:`~costaware.deploy.Deployment` (interleaved, so that a busy machine slows them alike),
prices them with :func:`costaware.deploy.serving_cost`, marks the row to deploy, and records
the figures in the ledger (``deploy_candidate`` and ``deploy_recommendation`` events).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from lightning_utilities.core.rank_zero import rank_zero_info
from torch import nn

from costaware.deploy import (
    Deployment,
    ServingCost,
    ServingTiming,
    measure_serving_many,
    recommend,
    serving_cost,
    serving_examples,
)
from costaware.records import DeployCandidateEvent, DeployRecommendationEvent
from costaware.strategies.base import ModelRow
from costaware.strategies.batches import call_model


@dataclass
class Candidate:
    """A model that could be deployed.

    Attributes:
        role: its row's role, ``"teacher"``, ``"student"``, ``"quantized"``.
        model: the model.
        train_usd: every training dollar it needed, its ancestors' included.
        metric: the monitored metric on the validation set.
        parent: the role it was made from.
        device: the only device it runs on (``"cpu"`` for a quantized CPU copy), or None: any.
        note: how it is served, for its row's note.
    """

    role: str
    model: nn.Module
    train_usd: float
    metric: Optional[float] = None
    parent: Optional[str] = None
    device: Optional[str] = None
    note: str = ""
    timing: Optional[ServingTiming] = None
    cost: Optional[ServingCost] = None


class LifetimeJudge:
    """Times, prices and ranks the candidates of one distillation under a ``Deployment``.

    Args:
        deployment: the serving load and price.
        split: the batch protocol's ``split(batch) -> (inputs, labels)``.
        val_data: validation batches; the timed examples are drawn across them.
        mode: ``"max"`` or ``"min"``, the metric's direction.
        usd_per_point: the policy's price of a point, used unless the deployment has its own.
        usd_per_s: the run's dollars per wall second, to price the timing itself.
        points_per_unit: the policy's points per unit of the metric, for the value.
    """

    def __init__(self, deployment: Deployment, split: Callable, val_data: Optional[Iterable], mode: str = "max",
                 usd_per_point: Optional[float] = None, usd_per_s: Optional[float] = None,
                 points_per_unit: float = 100.0) -> None:
        self.deployment = deployment
        self.points_per_unit = points_per_unit
        self.mode = mode
        self.usd_per_point = usd_per_point
        self.usd_per_s = usd_per_s
        self.examples = serving_examples(val_data, deployment.examples)
        self.forward = lambda model, batch: call_model(model, split(batch)[0])
        self.candidates: dict[str, Candidate] = {}
        self.measure_s = 0.0  # wall seconds spent timing
        self.recommended: Optional[str] = None
        self.reason = ""
        self.switch_usd = 0.0

    def add(self, candidate: Candidate) -> None:
        self.candidates[candidate.role] = candidate

    def update(self, role: str, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self.candidates[role], name, value)

    def time_all(self) -> None:
        """Time every candidate that can run on the serving device, interleaved."""
        runnable = {role: c.model for role, c in self.candidates.items()
                    if c.device is None or c.device == self.deployment.device.split(":")[0]}
        started_s = time.perf_counter()
        timings = measure_serving_many(runnable, self.examples, self.forward, self.deployment)
        self.measure_s += time.perf_counter() - started_s
        for role, timing in timings.items():
            self.candidates[role].timing = timing

    def best_case_saving_usd(self, before: str, after: str) -> Optional[float]:
        """Serving dollars saved by deploying ``after`` instead of ``before``, metric aside."""
        a, b = self.candidates[before].timing, self.candidates[after].timing
        if a is None or b is None:
            return None
        per_example_s = (a.latency_ms_per_example - b.latency_ms_per_example) / 1000.0
        return per_example_s * self.deployment.requests * self.deployment.usd_per_hour / 3600.0

    def decide(self, rows: list[ModelRow], ledger: Any = None, switch_usd: float = 0.0) -> Optional[str]:
        """Time all, price all, mark ``deploy`` on ``rows``, record the ledger events; the role to deploy.

        ``switch_usd``: what the switch spent beyond the teacher outside this timing (the
        student's fit, the quantization), for the net saving in the ledger.
        """
        self.switch_usd = switch_usd
        self.time_all()
        costs = []
        for role, candidate in self.candidates.items():
            if candidate.timing is None:
                continue
            candidate.cost = serving_cost(role, candidate.timing, self.deployment, candidate.train_usd,
                                          candidate.metric, self.mode, self.usd_per_point, self.points_per_unit)
            costs.append(candidate.cost)
        self.recommended, self.reason = recommend(costs, self.deployment) if costs else (None, "nothing timed")
        d = self.deployment
        for row in rows:
            cost = self.candidates[row.role].cost if row.role in self.candidates else None
            if cost is not None:  # the row's latency becomes the serving one, which its dollars come from
                row.usd_per_1k_requests, row.lifetime_usd, row.value_usd = (
                    cost.usd_per_1k_requests, cost.lifetime_usd, cost.value_usd)
                row.latency_ms_per_example = cost.latency_ms_per_example
                served = f"latency: serving, batch {d.batch_size}, {d.threads or 'all'} thread(s), {d.device}"
                extra = self.candidates[row.role].note
                row.note = "; ".join(x for x in (row.note, served + (f" ({extra})" if extra else "")) if x)
            row.deploy = row.role == self.recommended
        if ledger is not None:
            self._record(ledger, costs)
        rank_zero_info(f"costaware: deploy {self.reason}")
        return self.recommended

    def _record(self, ledger: Any, costs: list[ServingCost]) -> None:
        d = self.deployment
        for cost in costs:
            candidate = self.candidates[cost.role]
            ledger.record(DeployCandidateEvent(**cost.to_fields(), parent=candidate.parent,
                                               device=d.device, batch_size=d.batch_size, threads=d.threads,
                                               examples_timed=candidate.timing.examples if candidate.timing else None))
        teacher = self.candidates.get("teacher")
        chosen = self.candidates.get(self.recommended or "")
        measure_usd = self.measure_s * self.usd_per_s if self.usd_per_s is not None else 0.0
        switch_usd = self.switch_usd + measure_usd
        net = (teacher.cost.lifetime_usd - (teacher.cost.train_usd + chosen.cost.serving_usd + switch_usd)
               if teacher and chosen and teacher.cost and chosen.cost else None)
        ledger.record(DeployRecommendationEvent(
            role=self.recommended, reason=self.reason, requests=d.requests,
            usd_per_hour=d.usd_per_hour, device=d.device, batch_size=d.batch_size, sla_ms=d.sla_ms,
            usd_per_point=d.usd_per_point if d.usd_per_point is not None else self.usd_per_point,
            measure_s=self.measure_s, measure_usd=measure_usd, switch_usd=switch_usd, net_saving_usd=net))
