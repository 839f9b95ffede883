"""The report handed to real experiment trackers: a local MLflow file store and W&B offline (no server)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytestmark = pytest.mark.slow  # each starts the real tracker (W&B its service process): ~10-20 s


def _fit(ns, tmp_path, logger):
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=0.1, cpu_tdp_w=10, ram_power_w=3)
    trainer = ns.Trainer(max_steps=3, limit_val_batches=0, limit_test_batches=2, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
                         default_root_dir=tmp_path)
    model = ns.BoringModel()
    trainer.fit(model)
    trainer.test(model, verbose=False)  # its cost joins the report the tracker holds
    return monitor


def test_mlflow_file_store_gets_the_report_as_artifacts(pl_ns, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="costaware-test", tracking_uri=f"file:{tmp_path}/mlruns")
    monitor = _fit(pl_ns, tmp_path, logger)
    client = MlflowClient(tracking_uri=f"file:{tmp_path}/mlruns")
    listed = sorted(a.path for a in client.list_artifacts(logger.run_id, "costaware"))
    assert listed == ["costaware/report.html", "costaware/report.json", "costaware/report.md"]
    local = client.download_artifacts(logger.run_id, "costaware/report.json", str(tmp_path / "dl"))
    report = json.loads(Path(local).read_text())
    assert report["totals"]["usd"] == pytest.approx(monitor.totals.usd)
    assert "trainer.test" in [row["phase"] for row in report["phases"]["rows"]]  # the report as rebuilt after it
    # The monitored cost keys are in MLflow's metric history like any metric.
    assert client.get_metric_history(logger.run_id, "cost/usd")


def test_wandb_offline_run_holds_the_report(pl_ns, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(project="costaware-test", save_dir=str(tmp_path), offline=True)
    try:
        monitor = _fit(pl_ns, tmp_path, logger)
    finally:
        logger.experiment.finish()
    saved = sorted(p.name for p in (tmp_path / "wandb").rglob("files/costaware/*"))
    assert saved == ["report.html", "report.json", "report.md"]
    report = json.loads(next((tmp_path / "wandb").rglob("files/costaware/report.json")).read_text())
    assert report["totals"]["usd"] == pytest.approx(monitor.totals.usd)
    assert "trainer.test" in [row["phase"] for row in report["phases"]["rows"]]
