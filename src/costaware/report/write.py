"""Writing a run's report files next to its ledger, atomically.

``write_report`` is what ``CostMonitor`` calls at the end of a fit (and after an exception or an
interrupt), and what ``costaware report RUN_DIR`` calls on a ledger left by a killed run. Each
file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a reader never sees half a report, and nothing is written outside the
ledger's folder.

Example::

    from costaware.report import write_report

    paths = write_report("lightning_logs/version_0")
    print(paths["html"])
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from costaware.ledger import finite_json
from costaware.report.build import DEFAULT_MAX_POINTS, PathLike, build_report, find_ledger
from costaware.report.html import render_html
from costaware.report.markdown import render_markdown

#: The files a report is made of, by key.
REPORT_FILES = {"json": "report.json", "md": "report.md", "html": "report.html"}


def write_report(run_dir_or_ledger_path: PathLike, report: Optional[dict] = None,
                 max_points: int = DEFAULT_MAX_POINTS) -> dict[str, Path]:
    """Build the report of a run from its ledger and write ``report.json``, ``.md`` and ``.html``.

    The files go in the folder of the ledger that ``run_dir_or_ledger_path`` names
    (``<log_dir>/costaware/``), never anywhere a ``report`` dict points.

    Args:
        run_dir_or_ledger_path: a run directory, its ``costaware/`` folder, or ``ledger.jsonl``.
        report: an already built report dict of that ledger (skips building it again).
        max_points: most points kept per plotted series.

    Returns:
        ``{"json": Path, "md": Path, "html": Path}``.

    Raises:
        LedgerError: no ledger there (nothing to report).
        ValueError: ``report`` was built from another ledger.
        OSError: the folder cannot be written.
    """
    ledger = find_ledger(run_dir_or_ledger_path)
    if report is None:
        report = build_report(ledger, max_points=max_points)
    else:
        built_from = (report.get("ledger") or {}).get("path") if isinstance(report, dict) else None
        if not built_from or Path(built_from).resolve() != ledger.resolve():
            raise ValueError(f"the report was built from {built_from or 'an unknown ledger'}, not from {ledger}: "
                             "refusing to write it next to another run's ledger")
    folder = ledger.parent
    texts = {
        "json": json.dumps(finite_json(report), indent=1, allow_nan=False, default=str) + "\n",
        "md": render_markdown(report) + "\n",
        "html": render_html(report) + "\n",
    }
    paths = {}
    for key, name in REPORT_FILES.items():
        paths[key] = atomic_write(folder / name, texts[key], folder)
    return paths


def atomic_write(path: Path, text: str, within: Optional[Path] = None) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Args:
        path: the file to write.
        text: its whole content (UTF-8).
        within: if given, ``path`` must lie inside this folder (else ``ValueError``).
    """
    path = Path(path)
    folder = path.parent
    if within is not None:
        root = Path(within).resolve()
        if folder.resolve() != root and root not in folder.resolve().parents:
            raise ValueError(f"refusing to write {path}: outside {within}")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0o600; a report is as readable as any new file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    return path


def _umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it straight back)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable: fsync the folder (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
