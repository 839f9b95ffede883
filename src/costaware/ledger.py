"""The run's single record: cumulative totals, a time series, metric points and events.

On disk it is append-only JSONL (``<log_dir>/costaware/ledger.jsonl``), one record a line, each
with a ``kind``: ``header`` (schema version, run id, prices, meters), ``sample`` (totals and
readings at a moment), ``metric``, ``event`` (decisions, meter faults, resumes) and ``end``.
Records are buffered and flushed every few seconds and at the end, so a killed run loses at most
one flush interval and a truncated last line is the only damage it can leave. The meter's ledger
writes from a thread of its own (``background=True``): the training thread only queues lines.

The file stays bounded however long the run (a 30-day run at the fastest sample rate stays near
20 MB; see :class:`Ledger`): samples come at most one per ``min_sample_interval_s`` (the meters'
own sampling interval: a faster one holds no new reading), the most recent hour of them is kept
whole, and older ones are thinned progressively (one per time bucket, the bucket twice as wide
for every doubling of age). Every sample, event and the end carry the run's cumulative totals,
so thinning loses resolution in the plots, never a joule or a dollar of the totals.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
import time
import uuid
import warnings
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

from costaware import records as R

SCHEMA_VERSION = 2
LEDGER_FILENAME = "ledger.jsonl"
#: Samples younger than this (seconds, by wall time) are never thinned.
RECENT_S = 3600.0
#: Samples kept per doubling of age beyond ``RECENT_S`` (one per bucket of ``RECENT_S / TIER_SAMPLES`` s and up).
TIER_SAMPLES = 1000
#: How many samples a reader keeps at most (thinned evenly beyond it); totals come from the last one.
READ_MAX_SAMPLES = 20_000
_SAMPLE_PREFIX = b'{"kind": "sample"'
_WALL_TIME = re.compile(rb'"wall_time_s": (-?[0-9.eE+-]+)')


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
        return Totals(*[getattr(self, name) + getattr(other, name) for name in _TOTALS_FIELDS])

    def maximum(self, other: Totals) -> Totals:
        """Field by field, the larger of the two (totals never go backwards)."""
        return Totals(*[max(getattr(self, name), getattr(other, name)) for name in _TOTALS_FIELDS])

    def to_dict(self) -> dict:
        out = asdict(self)
        out["kwh"] = self.kwh
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Totals:
        return cls(**{f.name: float(data.get(f.name, 0.0)) for f in fields(cls)})


_TOTALS_FIELDS = tuple(f.name for f in fields(Totals))  # per-step arithmetic: not fields() at every call


#: Ledger files a meter of this process has opened and not yet closed (their header may still be
#: in the writer thread's queue): a second meter must not append to one.
OPEN_LEDGER_PATHS: set = set()


class LedgerError(ValueError):
    """A ledger file that cannot be read as one."""


class Ledger:
    """Buffers records and appends them to the ledger file; rank zero is the only writer.

    Records are the typed dataclasses of :mod:`costaware.records`, given to :meth:`record`.
    Each lands exactly once, on a line of its own: a write that fails part-way (disk full)
    keeps the bytes not yet written and continues from there, and a writer that finds the file
    ending mid-line (a killed run's torn line) starts on a fresh line.

    With ``background=True`` (the meter's ledger) every write, fsync and compaction happens in
    the ledger's own thread: :meth:`record` only queues a line; samples reach the disk every
    ``flush_interval_s`` (what a kill can lose), events and headers within milliseconds, and
    the end record (or :meth:`close`) writes whatever is left before returning.

    Bounded size: a sample closer than ``min_sample_interval_s`` to the last one kept is not
    written; once ``compact_every`` samples have been written since the last compaction, the
    writer rewrites the file (to a temporary file, fsynced, then renamed over it: a kill leaves
    the old or the new file, whole) keeping every non-sample line and every sample of the last
    ``RECENT_S`` seconds, and of older samples the first of each time bucket, the bucket width
    ``RECENT_S / TIER_SAMPLES`` doubled for each doubling of age past ``RECENT_S``: about
    ``TIER_SAMPLES`` samples per doubling of the run's length. Buckets sit at fixed multiples of
    their width, so a sample dropped once stays dropped and totals stay exact (each sample,
    event and the end carry cumulative totals; the last sample is always recent).

    Args:
        path: the JSONL file, or None on ranks that do not write.
        run_id: identifies the run across restarts (kept in checkpoints).
        flush_interval_s: how often buffered records reach the disk.
        background: write from a thread of the ledger's own, never the caller's.
        min_sample_interval_s: the least time between two samples written, seconds.
        compact_every: samples written between two compactions (0: never compact).

    Attributes:
        max_totals: field by field, the largest totals any record of this ledger carried.
    """

    def __init__(self, path: Optional[Path], run_id: Optional[str] = None, flush_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, background: bool = False,
                 min_sample_interval_s: float = 0.0, compact_every: int = 7200) -> None:
        self.path = Path(path) if path is not None else None
        self.run_id = run_id or uuid.uuid4().hex
        self.flush_interval_s = flush_interval_s
        self.min_sample_interval_s = min_sample_interval_s
        self.compact_every = compact_every
        self.totals = Totals()
        self.max_totals = Totals()
        #: How the run ends if it ends without an exception: set by the event that stops it.
        self.stopped_as: Optional[str] = None
        self._stop_raises = False
        self._clock = clock
        self._queue: deque = deque()  # lines recorded, not yet taken by a write (thread-safe appends)
        self._unwritten = b""  # the tail of a chunk a failed write left (its head is on disk)
        self._size_after_write: Optional[int] = None
        self._last_flush_s = clock()
        self._last_sample_s: Optional[float] = None
        self._samples_since_compaction = 0
        self.closed = False
        self._write_failed = False
        self._io_lock = threading.Lock()  # one write at a time, whichever thread
        self._wake = threading.Event()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        if background and self.path is not None:
            self._thread = threading.Thread(target=self._run, name="costaware-ledger", daemon=True)
            self._thread.start()

    def record(self, record: R.Record) -> None:
        """Append a typed record; headers, events and the end are flushed at once.

        Fills in ``wall_time_s``, an event's ``totals`` (the latest the ledger knows) and a
        header's schema and run id; an ``End`` record closes the ledger, its ``how`` taking
        the stop a cap or the policy recorded when the fit otherwise completed.
        """
        if isinstance(record, R.Sample) and self._too_soon_for_a_sample():
            return
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
        totals = getattr(record, "totals", None)
        if isinstance(totals, R.RecordedTotals):
            self.max_totals = self.max_totals.maximum(totals.to_totals())
        self._append(R.to_dict(record))
        if isinstance(record, R.End):
            self.close()
        elif isinstance(record, R.Sample):
            self.maybe_flush()
        elif not isinstance(record, R.Metric):
            self.flush_soon()

    def _too_soon_for_a_sample(self) -> bool:
        now_s = self._clock()
        if self._last_sample_s is not None and now_s - self._last_sample_s < self.min_sample_interval_s:
            return True
        self._last_sample_s = now_s
        return False

    def end_how(self, how: Optional[str]) -> str:
        """The end record's ``how``: a fit that completed after a cap or policy stop (or raised the error
        a cap was asked to raise) ended by that stop."""
        if self.stopped_as is not None and (how == "completed" or (how == "crashed" and self._stop_raises)):
            return self.stopped_as
        if how not in R.END_HOWS:
            raise ValueError(f"how must be one of {R.END_HOWS}, got {how!r}")
        return how

    def maybe_flush(self) -> None:
        """Flush if a flush interval has passed (the writer thread does it on its own when it runs)."""
        if self._thread is None and self._clock() - self._last_flush_s >= self.flush_interval_s:
            self.flush()

    def flush_soon(self) -> None:
        """Have the buffered records written now: by the writer thread, or here without one."""
        if self._thread is not None:
            self._wake.set()
        else:
            self.flush()

    def close(self) -> None:
        """Write everything recorded and stop the writer thread (idempotent)."""
        self.closed = True
        OPEN_LEDGER_PATHS.discard(self.path)
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(timeout=max(self.flush_interval_s, 5.0))
            if thread.is_alive():  # stuck in the file system (a hung network disk): never hang the fit
                warnings.warn(f"costaware: the ledger writer did not finish writing {self.path} in time; the "
                              "records it holds are written when it can", RuntimeWarning, stacklevel=2)
                return
        self.flush()

    def flush(self) -> None:
        """Write what is buffered now, in the calling thread (the writer thread calls it too)."""
        with self._io_lock:
            self._last_flush_s = self._clock()
            parts = []
            while self._queue:
                parts.append(self._queue.popleft())
            if self.path is None or not (parts or self._unwritten):
                return
            self._unwritten += "".join(parts).encode("utf-8")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._write()
            except OSError as err:  # disk full, permissions: keep what is not written, training goes on
                if not self._write_failed:
                    self._write_failed = True
                    warnings.warn(f"costaware: could not write the ledger {self.path} ({err}); its records are "
                                  "kept in memory and written at the next flush that succeeds", RuntimeWarning,
                                  stacklevel=2)
                return
            self._write_failed = False
            if self.compact_every and self._samples_since_compaction >= self.compact_every:
                self._compact()

    def _run(self) -> None:
        """The writer thread: flush every ``flush_interval_s``, or at once when woken by an event."""
        while not self._stopping:
            self._wake.wait(max(self.flush_interval_s, 0.05))  # flush_interval_s=0: as often as 20 times a second
            self._wake.clear()
            try:
                self.flush()
            except Exception as err:  # noqa: BLE001 - the writer must outlive any one failure
                warnings.warn(f"costaware: ledger writer error ({type(err).__name__}: {err})", RuntimeWarning,
                              stacklevel=2)

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

    def _compact(self) -> None:
        """Rewrite the file with its older samples thinned (see the class docstring); on any error keep it."""
        assert self.path is not None
        self._samples_since_compaction = 0
        tmp = self.path.with_name(self.path.name + ".compacting")
        try:
            with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                dst.writelines(thin_sample_lines(src.readlines()))
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, self.path)
            self._size_after_write = self.path.stat().st_size
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _append(self, record: dict) -> None:
        if self.path is not None:
            if record.get("kind") == "sample":
                self._samples_since_compaction += 1
            self._queue.append(json.dumps(finite_json(record), default=_jsonable, allow_nan=False) + "\n")


def _sample_wall_time(line: bytes) -> Optional[float]:
    if not line.startswith(_SAMPLE_PREFIX):
        return None
    found = _WALL_TIME.search(line, 0, 80)
    try:
        return float(found.group(1)) if found else None
    except ValueError:
        return None


def thin_sample_lines(lines: list, recent_s: float = RECENT_S, tier_samples: int = TIER_SAMPLES) -> list:
    """The ledger's lines with its older samples thinned (the rule of :class:`Ledger`); others kept as they are."""
    times = [_sample_wall_time(line) for line in lines]
    now = max((t for t in times if t is not None), default=None)
    if now is None:
        return lines
    base_s = recent_s / tier_samples
    kept, seen = [], set()
    for line, t in zip(lines, times):
        if t is not None and now - t > recent_s:
            width = base_s * 2.0 ** math.floor(math.log2((now - t) / recent_s))
            bucket = (width, math.floor(t / width))
            if bucket in seen:
                continue
            seen.add(bucket)
        kept.append(line)
    return kept


@dataclass
class LedgerContents:
    """What a ledger file holds, as typed records, plus what was wrong with it."""

    header: Optional[R.Header]
    samples: list
    metrics: list
    events: list
    end: Optional[R.End]
    problems: list
    #: How many sample lines the file holds (``samples`` may hold a thinned subset of them).
    sample_count: int = 0

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


def read_ledger(path, lenient: bool = False, max_samples: Optional[int] = READ_MAX_SAMPLES) -> LedgerContents:
    """Read a ledger into typed records, tolerating a truncated last line and reporting corrupt ones.

    A line that is not a record (not JSON, JSON too deep or with too long a number, not an
    object, a field of the wrong type) is skipped and listed in ``problems``; so is an event
    kind from a newer costaware, kept as an :class:`~costaware.records.UnknownEvent`. Impossible
    totals (negative, NaN, null) are listed too.

    The file is streamed, never held whole. Beyond ``max_samples`` samples, only every k-th
    sample line is parsed (k doubling as the file goes on, so at most ``2 * max_samples`` are
    held) plus the last one; the lines passed over are only checked to end as a JSON object
    does. ``contents.sample_count`` says how many sample lines the file holds. Totals come
    from the end record, the events and the last sample, never from the thinned ones.

    Args:
        path: the ledger file, or the folder that holds ``ledger.jsonl``.
        lenient: best effort for a report: a newer schema or a missing header becomes a
            problem in ``contents.problems`` instead of an error.
        max_samples: how many samples to keep at most (None: all).

    Raises:
        LedgerError: the file is missing or holds no costaware record; unless ``lenient``, it
            also has no header, or comes from a newer schema.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER_FILENAME
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}")
    contents = LedgerContents(header=None, samples=[], metrics=[], events=[], end=None, problems=[])
    reader = _Reader(contents, path, lenient, max_samples)
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                reader.line(number, line)
    except OSError as err:
        raise LedgerError(f"cannot read {path}: {err}") from err
    reader.finish()
    _check_header(contents, path, lenient)
    _upgrade_v1_end(contents)
    return contents


class _Reader:
    """The state of one streamed read: the pending bad line (corrupt, or the truncated last one) and thinning."""

    def __init__(self, contents: LedgerContents, path: Path, lenient: bool, max_samples: Optional[int]) -> None:
        self.contents, self.path, self.lenient, self.max_samples = contents, path, lenient, max_samples
        self.impossible: dict = {}
        self.bad: Optional[tuple] = None  # (number, error) of the last unreadable line
        self.stride = 1
        self.skipped_last: Optional[tuple] = None  # (number, line) of the last sample passed over
        self.last_number = 0  # the last non-empty line's

    def line(self, number: int, raw_line: bytes) -> None:
        stripped = raw_line.strip()
        if not stripped:
            return
        self._settle_bad()
        self.last_number = number
        if stripped.startswith(_SAMPLE_PREFIX) and self.max_samples is not None:
            self.contents.sample_count += 1
            if (self.contents.sample_count - 1) % self.stride:
                self.skipped_last = (number, stripped)
                if not stripped.endswith(b"}"):
                    self.bad = (number, None)
                return
            self.skipped_last = None
        elif stripped.startswith(_SAMPLE_PREFIX):
            self.contents.sample_count += 1
        self._parse(number, stripped)
        samples = self.contents.samples
        if self.max_samples is not None and len(samples) >= 2 * self.max_samples:
            del samples[1::2]
            self.stride *= 2

    def _parse(self, number: int, line: bytes) -> None:
        try:
            raw = json.loads(line.decode("utf-8", errors="replace"))
            record = R.from_dict(raw)
        except (ValueError, RecursionError, TypeError, KeyError, IndexError) as err:
            self.bad = (number, err)
            return
        _note_impossible_totals(raw, number, self.impossible)
        _file(self.contents, record, self.path, number, self.lenient)

    def _settle_bad(self, final: bool = False) -> None:
        if self.bad is None:
            return
        number, err = self.bad
        self.bad = None
        last = final and number == self.last_number
        where = "truncated last line (the run was probably killed)" if last else "corrupt line"
        detail = f" ({err})" if isinstance(err, R.RecordError) else ""
        self.contents.problems.append(f"{self.path.name}:{number}: {where}{detail}, skipped")

    def finish(self) -> None:
        if self.skipped_last is not None and self.bad is None:  # the last sample always counts
            self._parse(*self.skipped_last)
        self._settle_bad(final=True)
        self.contents.problems += [
            f"{self.path.name}:{first}: impossible totals in {count} {kind} record{'s' * (count > 1)}: {what}"
            for (kind, what), (count, first) in self.impossible.items()]


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
