"""``costaware``: report a run, compare runs, list prices.

::

    costaware report RUN_DIR                 # (re)write report.json/.md/.html next to the ledger
    costaware compare RUN_DIR... --out runs.html [--metric val_acc] [--mode max]
    costaware prices [--gpus] [--countries] [--cloud] [--json]
    costaware prior fit LEDGERS_OR_JSONL... -o prior.json   # MarginalGainStopping(prior="prior.json")

Exit codes:

- 0: done.
- 1: bad input, with the reason on stderr: a missing or unreadable ledger (no such path, no
  ledger in it, permission denied), an output that cannot be written, or a ledger that could
  only be read best-effort (newer schema, no header). In the last case, and for ``compare``
  when some runs were skipped, the output is still printed and written from what could be
  read, so a script can tell "done, but do not trust every figure" from 0.
- 2: a usage error (bad option, or ``compare --metric`` that no run records).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE = 0, 1, 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="costaware", description="Cost reports for PyTorch Lightning runs measured by costaware.",
        epilog="Exit codes: 0 ok; 1 bad input: a missing or unreadable ledger, or one read only best-effort "
               "(the output is still written); 2 usage error.")
    sub = parser.add_subparsers(dest="command", metavar="{report,compare,prices,prior}")

    report = sub.add_parser(
        "report", help="rebuild a run's report from its ledger",
        description="Rebuild report.json, report.md and report.html next to a run's ledger, from the ledger "
                    "alone (a killed run's ledger works too: its truncated last line is skipped and reported).")
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="a directory holding ledger.jsonl or costaware/ledger.jsonl, or the ledger file")
    report.add_argument("--print", dest="show", choices=("summary", "md", "json", "none"), default="summary",
                        help="what to print on stdout (default: the summary and the paths written)")
    report.set_defaults(run=_report)

    compare = sub.add_parser(
        "compare", help="rank runs by their monitored metric at its cost",
        description="Rank runs by the best value of their monitored metric against the dollars they spent in total "
                    "(every phase), the Pareto front first; runs that monitor different metrics are ranked in "
                    "separate groups, never against each other. Print the tables, and write them with a Pareto "
                    "plot (metric against dollars) to --out (.html page, or .svg for the plots alone, one per "
                    "metric, stacked).")
    compare.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run directories or ledger files")
    compare.add_argument("--metric", help="metric to rank every run by (default: each run's monitored metric, "
                                          "MarginalGainStopping's monitor or else the first metric it recorded, "
                                          "grouped by metric)")
    compare.add_argument("--mode", choices=("max", "min"),
                         help="which value is best (default: min for names like loss/error, else max)")
    compare.add_argument("--out", help="write the table and Pareto plots here (.html, or .svg for the plots alone)")
    compare.add_argument("--json", action="store_true", help="print the ranking as JSON instead of a table")
    compare.set_defaults(run=_compare)

    prices = sub.add_parser(
        "prices", help="list GPU prices and carbon intensities",
        description="The built-in GPU price table (with sources and dates) and the grid carbon intensities of "
                    "countries and cloud regions (codecarbon's bundled tables). All sections unless some are chosen.")
    prices.add_argument("--gpus", action="store_true", help="GPU prices")
    prices.add_argument("--countries", action="store_true", help="carbon intensity by country")
    prices.add_argument("--cloud", action="store_true", help="carbon intensity by cloud region")
    prices.add_argument("--json", action="store_true", help="print JSON")
    prices.set_defaults(run=_prices)
    _prior_parser(sub)
    return parser


def _prior_parser(sub: argparse._SubParsersAction) -> None:
    prior = sub.add_parser("prior", help="fit a prior over learning curves from past runs",
                           description="Past runs of the same kind are the best predictor of how a run goes on.")
    actions = prior.add_subparsers(dest="prior_command", metavar="{fit}", required=True)
    fit = actions.add_parser(
        "fit", help="fit a curve prior on ledgers or generic JSONL",
        description="Fit what the rest of a run brings, by stage (fraction of the plan, learning-rate state, "
                    "progress), on past runs, for MarginalGainStopping(prior=...). Inputs: run directories or "
                    "ledger files (their marginal_gain_decision events), or generic JSONL files (one run a line: "
                    "{\"points\": [[usd, metric, lr], ...], \"mode\", \"planned_cost_usd\", \"baseline\", "
                    "\"anneals\"}). Runs that stopped before 90%% of their plan, or whose metric is not bounded, "
                    "are left out.")
    fit.add_argument("inputs", metavar="LEDGERS_OR_JSONL", nargs="+", help="run directories, ledgers or .jsonl files")
    fit.add_argument("-o", "--out", required=True, help="the prior JSON to write")
    fit.set_defaults(run=_prior_fit)


def _prior_fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from costaware.curve_prior import CurvePrior, left_out_summary, runs_from_jsonl, runs_from_ledger
    from costaware.ledger import LedgerError

    runs = []
    for item in args.inputs:
        path = Path(item)
        try:
            if path.is_file() and path.suffix == ".jsonl" and path.name != "ledger.jsonl":
                runs += runs_from_jsonl(path)
            else:
                runs += runs_from_ledger(path)
        except (OSError, LedgerError, ValueError, KeyError, TypeError) as err:
            return _fail(f"{item}: {err}")
    try:
        prior = CurvePrior.fit(runs, source=f"costaware prior fit on {len(args.inputs)} input(s)")
        prior.save(args.out)
    except (OSError, ValueError) as err:
        return _fail(str(err))
    used = prior.cells["*/*/*/*"]["runs"]
    print(f"prior fitted on {used} of {len(runs)} runs ({len(prior.cells)} cells) -> {args.out}")
    if prior.left_out:
        print(f"left out: {left_out_summary(prior.left_out)}")
    return EXIT_OK


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"costaware: error: {message}", file=sys.stderr)
    return code


def _report(args: argparse.Namespace) -> int:
    from costaware.ledger import LedgerError
    from costaware.report import build_report, write_report
    from costaware.report import text as T

    try:
        report = build_report(args.run_dir)
    except LedgerError as err:
        return _fail(str(err))
    except OSError as err:  # permission denied, a folder where the file should be, an I/O error
        return _fail(f"could not read the ledger in {args.run_dir}: {err}")
    try:
        paths = write_report(args.run_dir, report=report)
    except OSError as err:
        return _fail(f"could not write the report: {err}")
    for problem in report["problems"]:
        print(f"costaware: warning: {problem}", file=sys.stderr)
    if args.show == "md":
        print(paths["md"].read_text(encoding="utf-8"), end="")
    elif args.show == "json":
        print(paths["json"].read_text(encoding="utf-8"), end="")
    elif args.show == "summary":
        for label, text in T.summary_rows(report):
            print(f"{label}: {text}")
        for path in paths.values():
            print(f"wrote {path}")
    if not report["ledger"]["trusted"]:
        return _fail(f"{report['ledger']['path']} could only be read best-effort ({report['problems'][0]}); "
                     f"the report was written anyway")
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from costaware.report.compare import CompareError, MetricNotFound, compare_runs, render_compare_text, write_compare

    try:
        result = compare_runs(args.run_dirs, metric=args.metric, mode=args.mode)
    except MetricNotFound as err:
        return _fail(str(err), EXIT_USAGE)
    except CompareError as err:
        return _fail(str(err))
    if args.json:
        def slim_runs(runs: list) -> list:
            return [{k: v for k, v in r.items() if not k.startswith("curve_")} for r in runs]

        slim = {**result, "runs": slim_runs(result["runs"]),
                "groups": [{**g, "runs": slim_runs(g["runs"])} for g in result["groups"]]}
        print(json.dumps(slim, indent=1, default=str))
    else:
        print(render_compare_text(result))
    if args.out:
        try:
            path = write_compare(result, args.out)
        except OSError as err:
            return _fail(f"could not write {args.out}: {err}")
        print(f"wrote {path}")
    for error in result["errors"]:
        print(f"costaware: warning: skipped {error}", file=sys.stderr)
    grouped = [run for group in result.get("groups", [{"runs": result["runs"]}]) for run in group["runs"]]
    untrusted = [run for run in grouped + result["unranked"] if not run["trusted"]]
    for run in untrusted:
        reason = run["problems"][0] if run["problems"] else "no reason recorded"
        print(f"costaware: warning: {run['source']} could only be read best-effort ({reason}); "
              "its figures may be wrong", file=sys.stderr)
    return EXIT_BAD_INPUT if result["errors"] or untrusted else EXIT_OK


def _prices(args: argparse.Namespace) -> int:
    from costaware import prices as P
    from costaware.report.text import text_table

    every = not (args.gpus or args.countries or args.cloud)
    out: dict = {}
    if every or args.gpus:
        out["gpus"] = [{"model": model, "usd_per_gpu_hour": p.usd_per_hour, "source": p.source, "as_of": p.as_of}
                       for model, p in sorted(P.GPU_PRICES.items())]
    if every or args.countries:
        mix = P._json("private_infra/global_energy_mix.json")
        out["countries"] = [{"iso3": code, "country": row.get("country_name"),
                             "g_co2_per_kwh": row.get("carbon_intensity"), "year": row.get("year")}
                            for code, row in sorted(mix.items())
                            if isinstance(row, dict) and row.get("carbon_intensity") is not None]
    if every or args.cloud:
        out["cloud_regions"] = [{"provider": r.get("provider"), "region": r.get("region"),
                                 "country": r.get("country_name"), "g_co2_per_kwh": float(r["impact"]),
                                 "source": r.get("source")} for r in P.cloud_regions() if r.get("impact")]
    if args.json:
        print(json.dumps(out, indent=1))
        return EXIT_OK
    if "gpus" in out:
        print("GPU on-demand prices (per GPU-hour; override with usd_per_gpu_hour=...)")
        print(text_table(["model", "$/GPU-h", "as of", "source"],
                         [[g["model"], f"{g['usd_per_gpu_hour']:.4g}", g["as_of"], g["source"]] for g in out["gpus"]]))
    if "countries" in out:
        print("\nGrid carbon intensity by country (codecarbon global_energy_mix; CostMonitor(country=ISO3))")
        print(text_table(["iso3", "country", "gCO2/kWh", "year"],
                         [[c["iso3"], str(c["country"]), f"{c['g_co2_per_kwh']:.4g}", str(c["year"])]
                          for c in out["countries"]]))
    if "cloud_regions" in out:
        print("\nGrid carbon intensity by cloud region (codecarbon; CostMonitor(cloud_provider=..., cloud_region=...))")
        print(text_table(["provider", "region", "country", "gCO2/kWh", "source"],
                         [[c["provider"], c["region"], str(c["country"]), f"{c['g_co2_per_kwh']:.4g}", str(c["source"])]
                          for c in out["cloud_regions"]]))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
