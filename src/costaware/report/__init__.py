"""Budget reports: a run's ledger rendered as JSON, Markdown and a self-contained HTML page.

A report needs only the ledger file, so a run that crashed or was killed can still be reported
(``costaware report RUN_DIR``). ``CostMonitor`` writes one at the end of every fit.

Example::

    from costaware.report import publish_to_loggers, write_report

    paths = write_report("lightning_logs/version_0")      # report.json, report.md, report.html
    publish_to_loggers(trainer.loggers, paths)            # TensorBoard text, MLflow/W&B artifacts
"""

from costaware.report.build import REPORT_SCHEMA_VERSION, build_report, find_ledger, load_ledger
from costaware.report.compare import compare_runs
from costaware.report.html import render_html
from costaware.report.loggers import publish_to_loggers
from costaware.report.markdown import render_markdown
from costaware.report.text import summary_lines
from costaware.report.write import REPORT_FILES, write_report

__all__ = [
    "REPORT_FILES",
    "REPORT_SCHEMA_VERSION",
    "build_report",
    "compare_runs",
    "find_ledger",
    "load_ledger",
    "publish_to_loggers",
    "render_html",
    "render_markdown",
    "summary_lines",
    "write_report",
]
