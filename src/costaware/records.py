"""Every kind of ledger record, as a typed dataclass, written and read by the same two functions.

A ledger line is ``to_dict(record)`` as JSON; ``from_dict(line)`` gives the typed record back.
Field names carry their units (``usd``, ``_s``, ``_j``, ``_bytes``); a field whose unit depends
on another field says so in its docstring (a cap's ``limit`` is in its ``unit``).

Schema 2 (this module) renamed, from schema 1: ``wall_time`` -> ``wall_time_s``; the
``seconds`` of ``online_probe``, ``distill`` and ``quantize`` -> ``duration_s``; a sample's
readings moved from the top level into ``readings``; ``quantize``'s ``teacher_*`` figures ->
``float_*`` (the model before quantization may be the student); the end record's ``how`` uses
one vocabulary (:data:`END_HOWS`; schema 1 wrote ``"exception"`` for ``"crashed"``). Schema-1
lines are mapped on reading, so old ledgers stay readable.

To add an event kind: subclass :class:`Event` with a ``NAME``, optional fields with units in
their names, and a docstring; decorate it with ``@event_kind``. Writers call
``ledger.record(MyEvent(...))``; readers get ``MyEvent`` back from ``read_ledger``.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Optional

from costaware.validation import is_number

#: How a run ended, in the end record: the only values a schema-2 ``how`` takes.
END_HOWS = ("completed", "budget_cap", "marginal_gain", "crashed", "interrupted")

#: The totals every record with totals carries (``kwh`` is derived from the energies on writing).
TOTAL_KEYS = ("elapsed_s", "gpu_hours", "host_hours", "gpu_energy_j", "cpu_energy_j", "ram_energy_j", "flops",
              "usd", "co2_kg", "train_batches", "kwh")


class RecordError(ValueError):
    """A ledger line that is not a record this module can read (wrong shape or field types)."""


# ------------------------------------------------------------------------------------------------
# Totals as recorded
# ------------------------------------------------------------------------------------------------


@dataclass
class RecordedTotals:
    """The run's cumulative totals as a record holds them; a figure the line lacks is None.

    Same meaning and units as :class:`costaware.ledger.Totals` (``elapsed_s`` seconds,
    ``*_hours`` hours, ``*_energy_j`` joules, ``usd`` dollars, ``co2_kg`` kilograms, ``kwh``
    kilowatt-hours), but never a made-up zero: a report must tell "not recorded" from 0.
    """

    elapsed_s: Optional[float] = None
    gpu_hours: Optional[float] = None
    host_hours: Optional[float] = None
    gpu_energy_j: Optional[float] = None
    cpu_energy_j: Optional[float] = None
    ram_energy_j: Optional[float] = None
    flops: Optional[float] = None
    usd: Optional[float] = None
    co2_kg: Optional[float] = None
    train_batches: Optional[float] = None
    kwh: Optional[float] = None

    @classmethod
    def of(cls, totals: Any) -> RecordedTotals:
        """From a :class:`costaware.ledger.Totals` (or anything with its attributes)."""
        return cls(**{key: float(getattr(totals, key)) for key in TOTAL_KEYS})

    @classmethod
    def read(cls, raw: Any) -> RecordedTotals:
        """From a line's ``totals`` object: numbers kept (NaN too, for the report to flag), others None."""
        if type(raw) is not dict:
            raise RecordError(f"totals must be an object, got {type(raw).__name__}")
        get = raw.get
        return cls(*[float(v) if type(v) is float or type(v) is int else None for v in map(get, TOTAL_KEYS)])

    def to_totals(self) -> Any:
        """As a :class:`costaware.ledger.Totals` (missing figures as 0), to continue a run from."""
        from costaware.ledger import Totals

        return Totals(**{k: v if v is not None and math.isfinite(v) else 0.0
                         for k, v in asdict(self).items() if k != "kwh"})


def totals_problems(raw: Any) -> list[str]:
    """What is impossible in a line's ``totals``: negative, NaN, null or non-numeric figures."""
    if type(raw) is not dict or all((type(v) is float or type(v) is int) and 0.0 <= v < _INF for v in raw.values()):
        return []  # (the common case, checked fast: a long ledger has a million of these)
    out = []
    for key in TOTAL_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if value is None:
            out.append(f"{key} is null")
        elif not is_number(value):
            out.append(f"{key} is not a number")
        elif math.isnan(value) or math.isinf(value):
            out.append(f"{key} is {value}")
        elif value < 0:
            out.append(f"{key} is negative")
    return out


_INF = float("inf")


# ------------------------------------------------------------------------------------------------
# The records
# ------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Record:
    """One ledger line.

    Attributes:
        wall_time_s: Unix time the record was written, seconds (the ledger fills it in).
        extra: fields this costaware does not know (from a newer writer), kept as they were.
    """

    KIND: ClassVar[str] = ""

    wall_time_s: Optional[float] = None
    extra: dict = field(default_factory=dict)

    # A read-only view of the record as written, for code that read schema-1 dicts
    # (``event["name"]``). New code reads the attributes.
    def __getitem__(self, key: str) -> Any:
        return to_dict(self)[key]

    def get(self, key: str, default: Any = None) -> Any:
        return to_dict(self).get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in to_dict(self)


@dataclass(kw_only=True)
class Header(Record):
    """The first line of each session (a resume writes another): schema, run, prices and meters.

    Attributes:
        schema: the ledger schema version this writer used.
        run_id: identifies the run across restarts.
        prices: ``Prices.to_dict()`` (dollars per GPU-hour, per host-hour, per kWh, PUE, gCO2/kWh).
        meters: each meter's status (``gpu``, ``host``, ``flops``).
        peak_flops_per_s: the device's peak FLOP/s at the run's precision, or None.
        accumulate_grad_batches: batches per optimizer step.
        resumed_from: the checkpoint's run id and dollars, for a resumed run.
    """

    KIND: ClassVar[str] = "header"

    schema: Any = None
    run_id: Optional[str] = None
    prices: Optional[dict] = None
    meters: Optional[dict] = None
    world_size: Optional[int] = None
    num_nodes: Optional[int] = None
    precision: Optional[str] = None
    peak_flops_per_s: Optional[float] = None
    max_steps: Optional[int] = None
    max_epochs: Optional[int] = None
    accumulate_grad_batches: Optional[int] = None
    resumed_from: Optional[dict] = None


@dataclass(kw_only=True)
class Sample(Record):
    """A point of the time series: the totals and the meters' readings at a moment.

    Attributes:
        totals: the run's totals then.
        readings: reading name -> value, the unit in the name (``gpu_power_w``, ``throughput_mfu_pct``).
    """

    KIND: ClassVar[str] = "sample"

    totals: Optional[RecordedTotals] = None
    readings: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Metric(Record):
    """A monitored metric's value at the run's cost so far (to plot it against dollars).

    Attributes:
        name: the metric (``val_acc``); value: its value (unitless, or the metric's own unit);
        step: the global step; usd: dollars spent then; elapsed_s: seconds held then.
    """

    KIND: ClassVar[str] = "metric"

    name: Optional[str] = None
    value: Optional[float] = None
    step: Optional[int] = None
    usd: Optional[float] = None
    elapsed_s: Optional[float] = None


@dataclass(kw_only=True)
class End(Record):
    """The last line of a session that ended in the process (not killed).

    Attributes:
        totals: the run's final totals.
        how: one of :data:`END_HOWS`.
        meters: each meter's status at the end.
        phases: this session's time and cost per phase (:data:`costaware.phases.PHASES`), each
            ``{"elapsed_s", "usd", "kwh", "co2_kg"}``; exclusive, so they sum to at most ``totals``.
        metered_from_wall_s, metered_to_wall_s: Unix times this session's metering started and its
            totals were taken (their difference is this session's share of ``totals.elapsed_s``).
        stopped_by: for a fit that "completed" because something other than costaware asked it to stop
            (``trainer.should_stop``: Lightning's ``EarlyStopping``, ``max_time``, the module), who did.
        optimizer_steps: ``trainer.global_step`` at the end, the unit of ``max_steps`` (a batch may take
            several under manual optimization, or a fraction with gradient accumulation).
    """

    KIND: ClassVar[str] = "end"

    totals: Optional[RecordedTotals] = None
    how: Optional[str] = None
    meters: Optional[dict] = None
    phases: Optional[dict] = None
    metered_from_wall_s: Optional[float] = None
    metered_to_wall_s: Optional[float] = None
    stopped_by: Optional[str] = None
    optimizer_steps: Optional[int] = None


@dataclass(kw_only=True)
class Event(Record):
    """A decision or incident; its kind is ``NAME``.

    Attributes:
        totals: the run's totals when it happened (the ledger fills in its latest).
    """

    KIND: ClassVar[str] = "event"
    NAME: ClassVar[str] = ""
    #: The end record's ``how`` when this event stops the run (None: it does not).
    STOPS_AS: ClassVar[Optional[str]] = None
    #: Whether the report lists it among the decisions and events (False: bookkeeping it reads itself).
    LISTED: ClassVar[bool] = True

    totals: Optional[RecordedTotals] = None

    @property
    def name(self) -> str:
        return self.NAME

    def stops_run(self) -> bool:
        """Whether this event ends the run (read by the ledger to say ``how`` in the end record)."""
        return self.STOPS_AS is not None

    def stops_by_raising(self) -> bool:
        """Whether the stop is an exception the user asked for (so a "crashed" fit ended by this stop)."""
        return False


EVENTS: dict[str, type] = {}


def event_kind(cls: type) -> type:
    """Register an :class:`Event` subclass under its ``NAME``, for reading it back."""
    assert issubclass(cls, Event) and cls.NAME and cls.NAME not in EVENTS, cls
    EVENTS[cls.NAME] = cls
    return cls


@dataclass(kw_only=True)
class UnknownEvent(Event):
    """An event this costaware does not know (written by a newer one): its fields stay in ``extra``."""

    event_name: str = ""

    @property
    def name(self) -> str:
        return self.event_name


@event_kind
@dataclass(kw_only=True)
class ResumedEvent(Event):
    """A later session's header, read as the event of resuming (the reader makes it; not written)."""

    NAME: ClassVar[str] = "resumed"

    header: Optional[Header] = None


@event_kind
@dataclass(kw_only=True)
class BudgetCapsEvent(Event):
    """The caps a ``BudgetCap`` enforces: ``caps`` maps ``max_usd``-style names to limits in their units."""

    NAME: ClassVar[str] = "budget_caps"

    caps: Optional[dict] = None
    on_cap: Optional[str] = None
    predictive: Optional[bool] = None
    previous_stop: Any = None


@event_kind
@dataclass(kw_only=True)
class BudgetCapHitEvent(Event):
    """A cap stopped the run.

    Attributes:
        cap: the argument (``max_usd``); unit: what it caps (``usd``, ``kwh``, ``elapsed_s``...);
        limit, value, predicted_next, next_batch, reserve: in ``unit``: the cap, what was spent,
        what one more batch and a stop would reach, the next batch's cost and a stop's cost;
        on_cap: what the cap does (``stop`` or ``raise``); decided_by: this rank or another;
        checkpoint: the stop checkpoint's path.
    """

    NAME: ClassVar[str] = "budget_cap_hit"
    STOPS_AS: ClassVar[Optional[str]] = "budget_cap"

    cap: Optional[str] = None
    unit: Optional[str] = None
    limit: Optional[float] = None
    value: Optional[float] = None
    predicted_next: Optional[float] = None
    next_batch: Optional[float] = None
    reserve: Optional[float] = None
    predictive: Optional[bool] = None
    step: Optional[int] = None
    epoch: Optional[int] = None
    on_cap: Optional[str] = None
    decided_by: Optional[str] = None
    checkpoint: Optional[str] = None

    def stops_by_raising(self) -> bool:
        return self.on_cap == "raise"


@event_kind
@dataclass(kw_only=True)
class BudgetWarningEvent(Event):
    """A share (``fraction``, 0-1) of a cap spent; ``limit`` and ``value`` in the cap's unit."""

    NAME: ClassVar[str] = "budget_warning"

    cap: Optional[str] = None
    fraction: Optional[float] = None
    limit: Optional[float] = None
    value: Optional[float] = None
    step: Optional[int] = None


@event_kind
@dataclass(kw_only=True)
class ForecastEvent(Event):
    """What the planned run would cost: ``forecast_usd`` dollars; ``forecast`` per unit; ``over``: caps it breaks."""

    NAME: ClassVar[str] = "forecast"

    forecast_usd: Optional[float] = None
    forecast: Optional[dict] = None
    planned_batches: Optional[float] = None
    batches_done: Optional[float] = None
    over: Optional[list] = None
    step: Optional[int] = None
    basis: Optional[str] = None


@event_kind
@dataclass(kw_only=True)
class MarginalGainPolicyEvent(Event):
    """A ``MarginalGainStopping``'s settings: ``usd_per_point`` is what one point of ``monitor`` is worth;
    ``metric_range`` the ``[low, high]`` it was given (absent where inferred from the values), so that a prior fitted
    on the ledger reads an error rate or a percentage as the bounded metric it is."""

    NAME: ClassVar[str] = "marginal_gain_policy"

    monitor: Optional[str] = None
    mode: Optional[str] = None
    usd_per_point: Optional[float] = None
    min_gain_per_usd: Optional[float] = None
    confidence: Optional[float] = None
    min_points: Optional[int] = None
    points_per_unit: Optional[float] = None
    strategies: Optional[list] = None
    resumed_points: Optional[int] = None
    anneals: Optional[bool] = None
    baseline: Optional[float] = None
    metric_range: Optional[list] = None


@event_kind
@dataclass(kw_only=True)
class MarginalGainDecisionEvent(Event):
    """One decision of the policy: ``stop`` or go on, and the estimate it used.

    Attributes:
        value: the metric then; usd: dollars spent then; gain_points(_upper): the expected (upper)
        gain in points over the next ``increment_usd`` dollars; gain_per_usd: the points per dollar the
        decision compared with the price (with ``past_gain_points_upper`` over ``past_increment_usd``:
        the geometric mean of that rate and the fit's, see ``costaware.curves.GainEstimate``);
        predicted_final: the fitted final value, with its stated interval ``predicted_final_low`` ..
        ``predicted_final_high``; usd_to_predicted_final: dollars more to reach it; lr: the
        learning rate at this evaluation; lr_schedule: the rates the scheduler sets from here to the
        planned end, ``[[fraction of the planned cost, lr], ...]``, on the decision that first used
        them; curve: the fitted curve, in words; curve_points: ``{"usd": [...], "value": [...]}``.
    """

    NAME: ClassVar[str] = "marginal_gain_decision"
    STOPS_AS: ClassVar[Optional[str]] = "marginal_gain"

    stop: Optional[bool] = None
    reason: Optional[str] = None
    monitor: Optional[str] = None
    value: Optional[float] = None
    usd: Optional[float] = None
    step: Optional[int] = None
    points: Optional[int] = None
    usd_per_point: Optional[float] = None
    gain_points: Optional[float] = None
    gain_points_upper: Optional[float] = None
    increment_usd: Optional[float] = None
    gain_per_usd: Optional[float] = None
    past_gain_points_upper: Optional[float] = None
    past_increment_usd: Optional[float] = None
    predicted_final: Optional[float] = None
    predicted_final_low: Optional[float] = None
    predicted_final_high: Optional[float] = None
    usd_to_predicted_final: Optional[float] = None
    lr: Optional[float] = None
    lr_schedule: Optional[list] = None
    curve: Optional[str] = None
    curve_points: Optional[dict] = None

    def stops_run(self) -> bool:
        return bool(self.stop)


@event_kind
@dataclass(kw_only=True)
class StrategyResultEvent(Event):
    """A strategy's rows for the teacher / student / quantized table (``ModelRow`` as dicts)."""

    NAME: ClassVar[str] = "strategy_result"

    strategy: Optional[str] = None
    reason: Optional[str] = None
    rows: Optional[list] = None


@event_kind
@dataclass(kw_only=True)
class StrategyFailedEvent(Event):
    """A strategy raised after the fit; the teacher is kept. ``error`` is ``Type: message``."""

    NAME: ClassVar[str] = "strategy_failed"

    strategy: Optional[str] = None
    reason: Optional[str] = None
    error: Optional[str] = None


@event_kind
@dataclass(kw_only=True)
class OnlineProbeEvent(Event):
    """One probe of an SSL run: ``acc`` (0-1) of ``probe`` on the embeddings, its ``duration_s`` and ``cost_usd``."""

    NAME: ClassVar[str] = "online_probe"

    metric: Optional[str] = None
    acc: Optional[float] = None
    duration_s: Optional[float] = None
    cost_usd: Optional[float] = None
    probe: Any = None
    step: Optional[int] = None
    train_examples: Optional[int] = None
    val_examples: Optional[int] = None


@event_kind
@dataclass(kw_only=True)
class StageAfterFitEvent(Event):
    """What a ``trainer.test``, ``validate`` or ``predict`` after the fit spent (``stage`` names it), metered
    apart at the fit's prices: ``duration_s``, ``usd``, ``kwh`` (at the device, before PUE), ``co2_kg``,
    ``gpu_hours``, ``host_hours``. Outside the fit's totals (``totals`` are the fit's, as it ended)."""

    NAME: ClassVar[str] = "stage_after_fit"

    stage: Optional[str] = None
    duration_s: Optional[float] = None
    usd: Optional[float] = None
    kwh: Optional[float] = None
    co2_kg: Optional[float] = None
    gpu_hours: Optional[float] = None
    host_hours: Optional[float] = None


@event_kind
@dataclass(kw_only=True)
class PhasesEvent(Event):
    """The time and cost per phase so far (at each validation), as ``End.phases``: what a report
    of a run killed before its end record shows. Not listed among the report's events."""

    NAME: ClassVar[str] = "phases"
    LISTED: ClassVar[bool] = False

    phases: Optional[dict] = None


@event_kind
@dataclass(kw_only=True)
class DistillEvent(Event):
    """A student distilled (``trained``) or not (``note`` says why); its dollars, steps and losses."""

    NAME: ClassVar[str] = "distill"

    trained: Optional[bool] = None
    note: Optional[str] = None
    student_usd: Optional[float] = None
    student_totals: Optional[dict] = None
    steps: Optional[int] = None
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    temperature: Optional[float] = None
    alpha: Optional[float] = None
    budget_left_usd: Optional[float] = None
    stopped_by_budget: Optional[bool] = None
    duration_s: Optional[float] = None
    student_ledger: Optional[str] = None
    path: Optional[str] = None
    student_params: Optional[int] = None
    student_metric: Optional[float] = None


@event_kind
@dataclass(kw_only=True)
class QuantizeEvent(Event):
    """A quantization of the teacher or the student (``of``), whoever ran it, and whether it is ``kept``.

    Attributes:
        bits, quant_type: the quantization; metric, mode: the metric compared and its direction;
        max_drop: the largest metric drop accepted; float_* / quantized_*: the model before and
        after (metric, size on disk in bytes, CPU latency in ms per example); path: the saved
        quantized weights; duration_s: seconds it took; usd: what those seconds cost (when the
        Distill chain ran it); note: the verdict in words; backend: the kept copy's backend
        (``torch_int8``, ``bitsandbytes_int8``...); objective: what a copy must lower (latency,
        memory, usd) by at least ``min_gain`` (a fraction); variants: each backend tried,
        ``{backend: {metric, size_bytes, latency_ms_per_example, acceptable}}``; rows: the model
        rows of the chain that ran it.
    """

    NAME: ClassVar[str] = "quantize"

    of: Optional[str] = None
    bits: Optional[int] = None
    quant_type: Optional[str] = None
    kept: Optional[bool] = None
    metric: Optional[str] = None
    mode: Optional[str] = None
    max_drop: Optional[float] = None
    float_metric: Optional[float] = None
    quantized_metric: Optional[float] = None
    float_size_bytes: Optional[int] = None
    quantized_size_bytes: Optional[int] = None
    float_latency_ms_per_example: Optional[float] = None
    quantized_latency_ms_per_example: Optional[float] = None
    path: Optional[str] = None
    duration_s: Optional[float] = None
    usd: Optional[float] = None
    note: Optional[str] = None
    backend: Optional[str] = None
    objective: Optional[str] = None
    min_gain: Optional[float] = None
    variants: Optional[dict] = None
    rows: Optional[list] = None

    @classmethod
    def from_rows(cls, rows: list, **settings: Any) -> QuantizeEvent:
        """From ``Quantize.apply``'s two ``ModelRow`` (the float model, then the quantized one)."""
        before, after = (rows[0], rows[-1]) if len(rows) > 1 else (None, rows[-1])
        return cls(float_metric=getattr(before, "metric", None), quantized_metric=after.metric,
                   float_size_bytes=getattr(before, "size_bytes", None), quantized_size_bytes=after.size_bytes,
                   float_latency_ms_per_example=getattr(before, "latency_ms_per_example", None),
                   quantized_latency_ms_per_example=after.latency_ms_per_example, note=after.note,
                   path=settings.pop("path", after.path), **settings)


@event_kind
@dataclass(kw_only=True)
class MeterDegradedEvent(Event):
    """A meter (``gpu``, ``host``) stopped measuring some or all of its figures; ``status`` says why."""

    NAME: ClassVar[str] = "meter_degraded"

    meter: Optional[str] = None
    status: Optional[str] = None


@event_kind
@dataclass(kw_only=True)
class ExceptionEvent(Event):
    """The fit raised: ``error`` is ``Type: message``; ``interrupted`` for a KeyboardInterrupt."""

    NAME: ClassVar[str] = "exception"

    error: Optional[str] = None
    interrupted: Optional[bool] = None


RECORDS: dict[str, type] = {cls.KIND: cls for cls in (Header, Sample, Metric, End)}


# ------------------------------------------------------------------------------------------------
# Writing and reading: the same field list both ways
# ------------------------------------------------------------------------------------------------


def to_dict(record: Record) -> dict:
    """The record as a JSON-ready dict (``kind``, ``name`` for events, then its fields, then ``extra``)."""
    out: dict = {"kind": record.KIND}
    if isinstance(record, Event):
        out["name"] = record.name
    for f in _declared(type(record)):
        value = getattr(record, f)
        if isinstance(value, RecordedTotals):
            value = asdict(value)
        elif isinstance(value, Header):
            value = to_dict(value)
        out[f] = value
    out.update({k: v for k, v in record.extra.items() if k not in out})
    return out


def from_dict(data: Any) -> Record:
    """The typed record of a ledger line's dict (schema 1 or 2).

    Raises:
        RecordError: not an object, no known ``kind``, or a field of the wrong type.
    """
    if not isinstance(data, dict):
        raise RecordError(f"a record is a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind == "event":
        name = data.get("name")
        if not isinstance(name, str):
            raise RecordError(f"an event's name must be a string, got {type(name).__name__}")
        cls = EVENTS.get(name, UnknownEvent)
    elif isinstance(kind, str) and kind in RECORDS:
        cls = RECORDS[kind]
    else:
        raise RecordError(f"unknown record kind {_short(kind)}")
    data = _upgrade_v1(cls, data)
    declared = _declared(cls)
    kwargs: dict = {}
    extra = {}
    for key, value in data.items():
        if key == "kind" or (key == "name" and issubclass(cls, Event)):
            continue
        if key in declared:
            kwargs[key] = _decode(cls, key, declared[key], value)
        else:
            extra[key] = value
    if cls is UnknownEvent:
        kwargs["event_name"] = data["name"]
    return cls(**kwargs, extra=extra)


def _upgrade_v1(cls: type, data: dict) -> dict:
    """Schema-1 field names and layouts mapped to schema 2 (recognised by their old names)."""
    v1_quantize = cls is QuantizeEvent and "rows" in data and "kept" not in data  # Distill's, schema 1
    if "wall_time" not in data and "seconds" not in data and not (cls is Sample and "readings" not in data) \
            and not (cls is End and data.get("how") == "exception") and not v1_quantize:
        return data
    data = dict(data)
    if "wall_time" in data and "wall_time_s" not in data:
        data["wall_time_s"] = data.pop("wall_time")
    if "seconds" in data and "duration_s" in _declared(cls) and "duration_s" not in data:
        data["duration_s"] = data.pop("seconds")
    if cls is Sample and "readings" not in data:
        data["readings"] = {k: data.pop(k) for k in list(data) if k not in ("kind", "wall_time_s", "totals")}
    if cls is End and data.get("how") == "exception":
        data["how"] = "crashed"
    if cls is QuantizeEvent:
        data = _quantize_v1(data)
    return data


def _quantize_v1(data: dict) -> dict:
    """Schema 1's quantize: ``teacher_*`` fields, or (from Distill) ``{of, rows}`` with no verdict."""
    for what in ("metric", "size_bytes", "latency_ms_per_example"):
        if f"teacher_{what}" in data:
            data[f"float_{what}"] = data.pop(f"teacher_{what}")
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        before, after = (rows[0], rows[-1]) if len(rows) > 1 else ({}, rows[-1])
        for what in ("metric", "size_bytes", "latency_ms_per_example"):
            data.setdefault(f"float_{what}", before.get(what))
            data.setdefault(f"quantized_{what}", after.get(what))
        data.setdefault("note", after.get("note"))
        data.setdefault("path", after.get("path"))
    return data


_CHECKS = {float: is_number, int: is_number,
           str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool),
           dict: lambda v: isinstance(v, dict), list: lambda v: isinstance(v, list)}


def _decode(cls: type, key: str, kind: Any, value: Any) -> Any:
    if value is None or kind is Any:
        return value
    if kind is RecordedTotals:
        return RecordedTotals.read(value)
    if kind is Header:
        return from_dict(value) if isinstance(value, dict) else None
    if not _CHECKS[kind](value):
        raise RecordError(f"{cls.__name__}.{key} must be {kind.__name__}, got {type(value).__name__}")
    return value


_DECLARED: dict[type, dict] = {}


def _declared(cls: type) -> dict:
    """``{field: base type}`` of a record class (``Optional[X]`` -> ``X``), ``extra`` excluded; cached."""
    if cls not in _DECLARED:
        hints = typing.get_type_hints(cls)
        out = {}
        for f in fields(cls):
            if f.name in ("extra", "event_name"):
                continue
            hint = hints[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
            out[f.name] = typing.get_origin(base) or base
        _DECLARED[cls] = out
    return _DECLARED[cls]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@event_kind
@dataclass(kw_only=True)
class DeployCandidateEvent(Event):
    """One candidate model's life at the stated deployment: measured serving, dollars and value.

    Attributes:
        role: teacher, student or quantized; parent: the model it came from; metric: on the
        validation set; latency_ms_per_example, request_p95_ms, throughput_per_s: measured on
        ``device`` at ``batch_size`` with ``threads`` CPU threads over ``examples_timed``
        examples; usd_per_1k_requests, serving_usd: serving dollars; train_usd: every training
        dollar it needed; lifetime_usd: training plus serving; value_usd: points x price per point
        minus lifetime dollars; meets_sla: its p95 within the SLA.
    """

    NAME: ClassVar[str] = "deploy_candidate"

    role: Optional[str] = None
    parent: Optional[str] = None
    metric: Optional[float] = None
    latency_ms_per_example: Optional[float] = None
    request_p95_ms: Optional[float] = None
    throughput_per_s: Optional[float] = None
    usd_per_1k_requests: Optional[float] = None
    serving_usd: Optional[float] = None
    train_usd: Optional[float] = None
    lifetime_usd: Optional[float] = None
    value_usd: Optional[float] = None
    meets_sla: Optional[bool] = None
    device: Optional[str] = None
    batch_size: Optional[int] = None
    threads: Optional[int] = None
    examples_timed: Optional[int] = None


@event_kind
@dataclass(kw_only=True)
class DeployRecommendationEvent(Event):
    """The model to deploy (``role``) and why, at the stated load and price.

    Attributes:
        requests, usd_per_hour, device, batch_size, sla_ms, usd_per_point: the deployment;
        measure_s, measure_usd: what timing the candidates took; switch_usd: everything the
        cheaper path spent (student fit, quantization, timing); net_saving_usd: the teacher's
        lifetime dollars minus the chosen model's, net of ``switch_usd``.
    """

    NAME: ClassVar[str] = "deploy_recommendation"

    role: Optional[str] = None
    reason: Optional[str] = None
    requests: Optional[int] = None
    usd_per_hour: Optional[float] = None
    device: Optional[str] = None
    batch_size: Optional[int] = None
    sla_ms: Optional[float] = None
    usd_per_point: Optional[float] = None
    measure_s: Optional[float] = None
    measure_usd: Optional[float] = None
    switch_usd: Optional[float] = None
    net_saving_usd: Optional[float] = None


@event_kind
@dataclass(kw_only=True)
class DistillOrAnnotateEvent(Event):
    """What the cheaper path's dollars would have bought as labels, and the metric the teacher's
    own curve predicts with them (``assumption`` says how)."""

    NAME: ClassVar[str] = "distill_or_annotate"

    switch_usd: Optional[float] = None
    usd_per_label: Optional[float] = None
    labels: Optional[int] = None
    examples_seen: Optional[float] = None
    teacher_metric: Optional[float] = None
    predicted_metric_with_labels: Optional[float] = None
    student_metric: Optional[float] = None
    assumption: Optional[str] = None
