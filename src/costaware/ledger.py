"""The run's single record: cumulative totals, a time series, metric points and events.

On disk it is append-only JSONL (``<log_dir>/costaware/ledger.jsonl``), one record a line, each
with a ``kind``: ``header`` (schema version, run id, prices, meters), ``sample`` (totals and
readings at a moment), ``metric``, ``event`` (decisions, meter faults, resumes) and ``end``.
Records are buffered and flushed every few seconds and at the end, so a killed run loses at most
one flush interval and a truncated last line is the only damage it can leave.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

SCHEMA_VERSION = 1
LEDGER_FILENAME = "ledger.jsonl"


@dataclass
class Totals:
    """Cumulative cost of a run, over all ranks and restarts.

    Attributes:
        elapsed_s: wall-clock seconds the run has held its machines.
        gpu_hours: GPU-hours held (wall hours x GPUs).
        host_hours: host-hours held (wall hours x nodes), what host rental is priced on.
        gpu_energy_j: GPU energy, joules, summed over devices.
        cpu_energy_j: host CPU energy, joules, summed over nodes.
        ram_energy_j: host memory energy, joules, summed over nodes.
        flops: training floating-point operations.
        usd: dollars spent.
        co2_kg: kilograms of CO2-equivalent emitted.
        train_batches: training batches run (summed over ranks).
    """

    elapsed_s: float = 0.0
    gpu_hours: float = 0.0
    host_hours: float = 0.0
    gpu_energy_j: float = 0.0
    cpu_energy_j: float = 0.0
    ram_energy_j: float = 0.0
    flops: float = 0.0
    usd: float = 0.0
    co2_kg: float = 0.0
    train_batches: float = 0.0

    @property
    def energy_j(self) -> float:
        return self.gpu_energy_j + self.cpu_energy_j + self.ram_energy_j

    @property
    def kwh(self) -> float:
        return self.energy_j / 3.6e6

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Totals)))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["kwh"] = self.kwh
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Totals:
        return cls(**{f.name: float(data.get(f.name, 0.0)) for f in fields(cls)})


class LedgerError(ValueError):
    """A ledger file that cannot be read as one."""


class Ledger:
    """Buffers records and appends them to the ledger file; rank zero is the only writer.

    Args:
        path: the JSONL file, or None on ranks that do not write.
        run_id: identifies the run across restarts (kept in checkpoints).
        flush_interval_s: how often buffered records reach the disk.
    """

    def __init__(self, path: Optional[Path], run_id: Optional[str] = None, flush_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path) if path is not None else None
        self.run_id = run_id or uuid.uuid4().hex
        self.flush_interval_s = flush_interval_s
        self.totals = Totals()
        self._clock = clock
        self._buffer: list[str] = []
        self._last_flush_s = clock()
        self.closed = False
        self._write_failed = False

    def write_header(self, **info: Any) -> None:
        self._append({"kind": "header", "schema": SCHEMA_VERSION, "run_id": self.run_id, "wall_time": time.time(),
                      **info})
        self.flush()

    def record_sample(self, totals: Totals, **readings: Any) -> None:
        """A point of the time series: the run's totals and the current readings."""
        self.totals = totals
        self._append({"kind": "sample", "wall_time": time.time(), "totals": totals.to_dict(), **readings})
        self.maybe_flush()

    def record_metric(self, name: str, value: float, step: int) -> None:
        """A monitored metric at the run's cost so far, so it can be plotted against dollars."""
        self._append({"kind": "metric", "name": name, "value": value, "step": step,
                      "usd": self.totals.usd, "elapsed_s": self.totals.elapsed_s, "wall_time": time.time()})

    def record_event(self, name: str, **info: Any) -> None:
        """A decision or incident (cap hit, stop, meter fault, resume), flushed at once."""
        self._append({"kind": "event", "name": name, "wall_time": time.time(), "totals": self.totals.to_dict(), **info})
        self.flush()

    def close(self, totals: Totals, **info: Any) -> None:
        self.totals = totals
        self._append({"kind": "end", "wall_time": time.time(), "totals": totals.to_dict(), **info})
        self.flush()
        self.closed = True

    def maybe_flush(self) -> None:
        if self._clock() - self._last_flush_s >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush_s = self._clock()
        if self.path is None or not self._buffer:
            self._buffer.clear()
            return
        lines, self._buffer = self._buffer, []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # disk full, permissions: keep the records, training goes on
            self._buffer = lines + self._buffer
            if not self._write_failed:
                self._write_failed = True
                warnings.warn(f"costaware: could not write the ledger {self.path} ({err}); its records are kept "
                              "in memory and written at the next flush that succeeds", RuntimeWarning, stacklevel=2)
            return
        self._write_failed = False

    def _append(self, record: dict) -> None:
        if self.path is not None:
            self._buffer.append(json.dumps(finite_json(record), default=_jsonable, allow_nan=False) + "\n")


@dataclass
class LedgerContents:
    """What a ledger file holds, plus what was wrong with it."""

    header: dict
    samples: list
    metrics: list
    events: list
    end: Optional[dict]
    problems: list

    @property
    def totals(self) -> Totals:
        """The latest totals the file records (its end record, else its last sample or event)."""
        for record in ([self.end] if self.end else []) + self.samples[::-1][:1] + self.events[::-1][:1]:
            if record and "totals" in record:
                return Totals.from_dict(record["totals"])
        return Totals()

    @property
    def last_totals(self) -> Totals:
        """The largest spend recorded anywhere in the file (the run may have died after it)."""
        best = Totals()
        for record in self.samples + self.events + ([self.end] if self.end else []):
            if "totals" in record and record["totals"].get("usd", 0.0) >= best.usd:
                best = Totals.from_dict(record["totals"])
        return best


def header_run_id(path: Path) -> Optional[str]:
    """The run id in a ledger file's first line, or None when it has no readable header."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            record = json.loads(f.readline())
        return record.get("run_id") if isinstance(record, dict) and record.get("kind") == "header" else None
    except (OSError, json.JSONDecodeError):
        return None


def read_ledger(path, lenient: bool = False) -> LedgerContents:
    """Read a ledger, tolerating a truncated last line and reporting corrupt ones.

    Args:
        path: the ledger file, or the folder that holds ``ledger.jsonl``.
        lenient: best effort for a report: a newer schema or a missing header becomes a
            problem in ``contents.problems`` instead of an error.

    Raises:
        LedgerError: the file is missing or holds no costaware record; unless ``lenient``, it
            also has no header, or comes from a newer schema.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER_FILENAME
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    contents = LedgerContents(header={}, samples=[], metrics=[], events=[], end=None, problems=[])
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["kind"]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            where = "truncated last line (the run was probably killed)" if number - 1 == last else "corrupt line"
            contents.problems.append(f"{path.name}:{number}: {where}, skipped")
            continue
        if kind == "header":
            schema = record.get("schema", 0)
            if not lenient and not isinstance(schema, int):
                raise LedgerError(f"{path}: header schema must be an integer, got {schema!r}")
            if not lenient and schema > SCHEMA_VERSION:
                raise LedgerError(f"{path} has schema {schema}, newer than this costaware reads "
                                  f"({SCHEMA_VERSION}); upgrade costaware")
            if not contents.header:
                contents.header = record
            else:
                fields_ = {k: v for k, v in record.items() if k != "kind"}
                contents.events.append({"kind": "event", "name": "resumed", **fields_})
        elif kind == "sample":
            contents.samples.append(record)
        elif kind == "metric":
            contents.metrics.append(record)
        elif kind == "event":
            contents.events.append(record)
        elif kind == "end":
            contents.end = record
        else:
            contents.problems.append(f"{path.name}:{number}: unknown record kind {kind!r}, skipped")
    if not contents.header:
        if not lenient:
            raise LedgerError(f"{path} has no header record: not a costaware ledger")
        if not (contents.samples or contents.metrics or contents.events or contents.end):
            raise LedgerError(f"{path} holds no costaware record: not a costaware ledger")
        contents.problems.append("no header record: prices, meters and the run's plan are unknown")
    return contents


def finite_json(value: Any):
    """JSON has no NaN or infinity: a diverged metric (or a report figure copied from one) is written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _jsonable(value: Any):
    if hasattr(value, "item"):
        return finite_json(value.item())
    return str(value)
