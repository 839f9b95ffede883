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

from costaware import records as R

SCHEMA_VERSION = 2
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

    Records are the typed dataclasses of :mod:`costaware.records`, given to :meth:`record`.
    Each lands exactly once, on a line of its own: a write that fails part-way (disk full)
    keeps the bytes not yet written and continues from there, and a writer that finds the file
    ending mid-line (a killed run's torn line) starts on a fresh line.

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
        #: How the run ends if it ends without an exception: set by the event that stops it.
        self.stopped_as: Optional[str] = None
        self._stop_raises = False
        self._clock = clock
        self._buffer: list[str] = []
        self._unwritten = b""  # the tail of a chunk a failed write left (its head is on disk)
        self._size_after_write: Optional[int] = None
        self._last_flush_s = clock()
        self.closed = False
        self._write_failed = False

    def record(self, record: R.Record) -> None:
        """Append a typed record; headers, events and the end are flushed at once.

        Fills in ``wall_time_s``, an event's ``totals`` (the latest the ledger knows) and a
        header's schema and run id; an ``End`` record closes the ledger, its ``how`` taking
        the stop a cap or the policy recorded when the fit otherwise completed.
        """
        if record.wall_time_s is None:
            record.wall_time_s = time.time()
        if isinstance(record, R.Header):
            record.schema, record.run_id = SCHEMA_VERSION, self.run_id
        elif isinstance(record, R.Event):
            if record.totals is None:
                record.totals = R.RecordedTotals.of(self.totals)
            if record.stops_run() and self.stopped_as is None:
                self.stopped_as, self._stop_raises = record.STOPS_AS, record.stops_by_raising()
        elif isinstance(record, R.End):
            record.how = self.end_how(record.how)
        self._append(R.to_dict(record))
        if isinstance(record, R.Sample):
            self.maybe_flush()
        elif not isinstance(record, R.Metric):
            self.flush()
        if isinstance(record, R.End):
            self.closed = True

    def end_how(self, how: Optional[str]) -> str:
        """The end record's ``how``: a fit that completed after a cap or policy stop (or raised the error
        a cap was asked to raise) ended by that stop."""
        if self.stopped_as is not None and (how == "completed" or (how == "crashed" and self._stop_raises)):
            return self.stopped_as
        if how not in R.END_HOWS:
            raise ValueError(f"how must be one of {R.END_HOWS}, got {how!r}")
        return how

    def maybe_flush(self) -> None:
        if self._clock() - self._last_flush_s >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush_s = self._clock()
        if self.path is None or not (self._buffer or self._unwritten):
            self._buffer.clear()
            return
        lines, self._buffer = self._buffer, []
        self._unwritten += "".join(lines).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write()
        except OSError as err:  # disk full, permissions: keep what is not written, training goes on
            if not self._write_failed:
                self._write_failed = True
                warnings.warn(f"costaware: could not write the ledger {self.path} ({err}); its records are kept "
                              "in memory and written at the next flush that succeeds", RuntimeWarning, stacklevel=2)
            return
        self._write_failed = False

    def _write(self) -> None:
        """Append ``self._unwritten``, dropping each byte from it once written (never written twice)."""
        assert self.path is not None  # flush returns early on ranks that do not write
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            continuing = self._size_after_write is not None and size == self._size_after_write
            if size and not continuing and os.pread(fd, 1, size - 1) != b"\n":
                # A torn last line (a killed run), or a partial line someone else left: start afresh.
                self._unwritten = b"\n" + self._unwritten
            try:
                while self._unwritten:
                    written = os.write(fd, self._unwritten)
                    self._unwritten = self._unwritten[written:]
            finally:
                self._size_after_write = os.fstat(fd).st_size
            os.fsync(fd)
        finally:
            os.close(fd)

    def _append(self, record: dict) -> None:
        if self.path is not None:
            self._buffer.append(json.dumps(finite_json(record), default=_jsonable, allow_nan=False) + "\n")


@dataclass
class LedgerContents:
    """What a ledger file holds, as typed records, plus what was wrong with it."""

    header: Optional[R.Header]
    samples: list
    metrics: list
    events: list
    end: Optional[R.End]
    problems: list

    @property
    def totals(self) -> Totals:
        """The latest totals the file records (its end record, else its last sample or event)."""
        for record in ([self.end] if self.end else []) + self.samples[::-1][:1] + self.events[::-1][:1]:
            if record is not None and record.totals is not None:
                return record.totals.to_totals()
        return Totals()

    @property
    def last_totals(self) -> Totals:
        """The largest spend recorded anywhere in the file (the run may have died after it)."""
        best = Totals()
        for record in self.samples + self.events + ([self.end] if self.end else []):
            totals = record.totals
            if totals is not None and totals.usd is not None and totals.usd >= best.usd:
                best = totals.to_totals()
        return best


def header_run_id(path: Path) -> Optional[str]:
    """The run id in a ledger file's first line, or None when it has no readable header."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            record = R.from_dict(json.loads(f.readline()))
        return record.run_id if isinstance(record, R.Header) else None
    except (OSError, ValueError, RecursionError):
        return None


def read_ledger(path, lenient: bool = False) -> LedgerContents:
    """Read a ledger into typed records, tolerating a truncated last line and reporting corrupt ones.

    A line that is not a record (not JSON, JSON too deep or with too long a number, not an
    object, a field of the wrong type) is skipped and listed in ``problems``; so is an event
    kind from a newer costaware, kept as an :class:`~costaware.records.UnknownEvent`. Impossible
    totals (negative, NaN, null) are listed too.

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
    contents = LedgerContents(header=None, samples=[], metrics=[], events=[], end=None, problems=[])
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    impossible: dict = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            record = R.from_dict(raw)
        except (ValueError, RecursionError, TypeError, KeyError, IndexError) as err:
            where = "truncated last line (the run was probably killed)" if number - 1 == last else "corrupt line"
            detail = f" ({err})" if isinstance(err, R.RecordError) else ""
            contents.problems.append(f"{path.name}:{number}: {where}{detail}, skipped")
            continue
        _note_impossible_totals(raw, number, impossible)
        _file(contents, record, path, number, lenient)
    contents.problems += [f"{path.name}:{first}: impossible totals in {count} {kind} record{'s' * (count > 1)}: {what}"
                          for (kind, what), (count, first) in impossible.items()]
    _check_header(contents, path, lenient)
    _upgrade_v1_end(contents)
    return contents


def _upgrade_v1_end(contents: LedgerContents) -> None:
    """Schema 1 wrote ``how="completed"`` for a fit a cap or the policy stopped: say which, as schema 2 does."""
    end = contents.end
    if contents.header is None or contents.header.schema != 1 or end is None or end.how != "completed":
        return
    for event in contents.events[::-1]:
        if isinstance(event, R.ResumedEvent):
            return
        if isinstance(event, R.Event) and event.stops_run():
            end.how = event.STOPS_AS
            return


def _note_impossible_totals(raw: dict, number: int, impossible: dict) -> None:
    for what in R.totals_problems(raw.get("totals")):
        kind = raw.get("name") if raw.get("kind") == "event" else raw.get("kind")
        count, first = impossible.get((kind, what), (0, number))
        impossible[(kind, what)] = (count + 1, first)


def _file(contents: LedgerContents, record: R.Record, path: Path, number: int, lenient: bool) -> None:
    """Put one record where it belongs; a second header is the event of a resume."""
    if isinstance(record, R.Header):
        schema = record.schema if record.schema is not None else 0
        if not lenient and (not isinstance(schema, int) or isinstance(schema, bool)):
            raise LedgerError(f"{path}: header schema must be an integer, got {schema!r}")
        if not lenient and schema > SCHEMA_VERSION:
            raise LedgerError(f"{path} has schema {schema}, newer than this costaware reads "
                              f"({SCHEMA_VERSION}); upgrade costaware")
        if contents.header is None:
            contents.header = record
        else:
            contents.events.append(R.ResumedEvent(wall_time_s=record.wall_time_s, header=record))
    elif isinstance(record, R.Sample):
        contents.samples.append(record)
    elif isinstance(record, R.Metric):
        contents.metrics.append(record)
    elif isinstance(record, R.End):
        contents.end = record
    else:
        if isinstance(record, R.UnknownEvent):
            contents.problems.append(f"{path.name}:{number}: unknown event {record.name!r} (from a newer "
                                     "costaware?), kept with its fields as they are")
        contents.events.append(record)


def _check_header(contents: LedgerContents, path: Path, lenient: bool) -> None:
    if contents.header is not None:
        return
    if not lenient:
        raise LedgerError(f"{path} has no header record: not a costaware ledger")
    if not (contents.samples or contents.metrics or contents.events or contents.end):
        raise LedgerError(f"{path} holds no costaware record: not a costaware ledger")
    contents.problems.append("no header record: prices, meters and the run's plan are unknown")


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
