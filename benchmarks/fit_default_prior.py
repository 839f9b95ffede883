"""Fit the curve prior costaware ships (``src/costaware/data/curve_prior.json``).

On the ``tune`` halves only (``replay_curves.half_of``) of the recorded runs with a bounded
metric and a plan: DeBERTa-base on MNLI (shared data, learning rates from its linear schedule)
and this repository's digits corpus (``benchmarks/curves/digits.jsonl``, from scratch and SSL).
The ``test`` halves stay held out for ``replay_curves.py``. NAS-Bench-NLP (a loss, no plan) does
not inform it.

Usage::

    python benchmarks/fit_default_prior.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replay_curves as rc
from costaware.curve_prior import CurvePrior, run_from_record

OUT = rc._REPO / "src" / "costaware" / "data" / "curve_prior.json"


def main() -> int:
    usd_per_example = rc.USD_PER_GPU_HOUR / 3600.0 / rc.DEBERTA_EXAMPLES_PER_GPU_SECOND
    records = rc.deberta_records(rc.DEFAULT_DATA / "curves" / "deberta-mnli" / "deberta-base_tuning.results.jsonl",
                                 usd_per_example)
    with open(sys.argv[1] if len(sys.argv) > 1 else rc.CORPUS) as f:
        records += [json.loads(line) for line in f if line.strip()]
    tune = [r for r in records if rc.half_of(str(r["id"])) == "tune"]
    prior = CurvePrior.fit([run_from_record(r) for r in tune],
                           source=f"costaware default: tune halves of DeBERTa-MNLI and the digits corpus, "
                                  f"{len(tune)} runs")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    prior.save(OUT)
    print(f"{prior.source}: {len(prior.cells)} cells -> {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
