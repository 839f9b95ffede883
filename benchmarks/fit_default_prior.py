"""Fit the curve priors costaware ships (``costaware.curve_prior.PACKAGED_PRIORS``).

On the ``tune`` halves only (``replay_curves.half_of``) of the recorded runs with a bounded
metric and a plan. ``default`` (``src/costaware/data/curve_prior.json``): DeBERTa-base on MNLI
(shared data, learning rates from its linear schedule) and this repository's digits corpus
(``benchmarks/curves/digits.jsonl``, from scratch and SSL). ``from-scratch``
(``curve_prior_from_scratch.json``): the digits corpus alone. The ``test`` halves stay held out
for ``replay_curves.py``, and so do its held-out corpora (late-step, pairs, LoRA). NAS-Bench-NLP
(a loss, no plan) informs neither.

Usage::

    python benchmarks/fit_default_prior.py [--corpus FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replay_curves as rc
from costaware.curve_prior import PACKAGED_PRIORS, CurvePrior, run_from_record

DATA = rc._REPO / "src" / "costaware" / "data"
FROM_SCRATCH_WHAT = "the digits corpus (from scratch and SSL)"


def fit_tune_half(records: list[dict], name: str, what: str) -> CurvePrior:
    """The packaged prior ``name``: fitted on the tune half of ``records`` (generic-JSONL records) alone."""
    tune = [r for r in records if rc.half_of(str(r["id"])) == "tune"]
    return CurvePrior.fit([run_from_record(r) for r in tune],
                          source=f"costaware {name}: tune halves of {what}, {len(tune)} runs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=rc.CORPUS, help="the digits corpus (generic JSONL)")
    args = parser.parse_args(argv)
    usd_per_example = rc.USD_PER_GPU_HOUR / 3600.0 / rc.DEBERTA_EXAMPLES_PER_GPU_SECOND
    deberta = rc.deberta_records(rc.DEFAULT_DATA / "curves" / "deberta-mnli" / "deberta-base_tuning.results.jsonl",
                                 usd_per_example)
    with open(args.corpus) as f:
        digits = [json.loads(line) for line in f if line.strip()]
    for name, records, what in (("default", deberta + digits, "DeBERTa-MNLI and the digits corpus"),
                                ("from-scratch", digits, FROM_SCRATCH_WHAT)):
        prior = fit_tune_half(records, name, what)
        out = DATA / PACKAGED_PRIORS[name]
        out.parent.mkdir(parents=True, exist_ok=True)
        prior.save(out)
        print(f"{prior.source}: {len(prior.cells)} cells -> {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
