"""CostMonitor from LightningCLI flags and from the preset in callbacks/, in both namespaces."""

import os
import subprocess
import sys
import textwrap
from importlib import import_module
from pathlib import Path

import pytest
import torch

from conftest import preset_for
from costaware.ledger import read_ledger

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "callbacks" / "cost_monitor.yaml"


def _cli(ns, args):
    cli = import_module(f"{ns.name}.cli")
    return cli.LightningCLI(ns.BoringModel, args=args, save_config_kwargs={"overwrite": True})


def _class_path(ns):
    return "costaware.CostMonitor"  # the same class path under both namespaces


def test_flags_add_cost_monitor(ns, tmp_path):
    cli = _cli(ns, ["fit", f"--trainer.callbacks+={_class_path(ns)}", "--trainer.callbacks.usd_per_host_hour=7.2",
                    "--trainer.callbacks.country=DEU", "--trainer.callbacks.cpu_tdp_w=10", "--trainer.max_steps=3",
                    "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.enable_progress_bar=false"])
    monitors = [c for c in cli.trainer.callbacks if type(c).__name__ == "CostMonitor"]
    assert len(monitors) == 1
    assert monitors[0].prices.usd_per_host_hour == 7.2 and "Germany" in monitors[0].prices.carbon.source
    assert monitors[0].totals.usd > 0 and cli.trainer.global_step == 3


def test_the_cli_s_test_subcommand_is_charged_to_the_run_that_fitted_the_checkpoint(ns, tmp_path):
    """``fit``, then ``test --ckpt_path=...`` (a new LightningCLI, as a second process would be)."""
    flags = [f"--trainer.callbacks+={_class_path(ns)}", "--trainer.callbacks.usd_per_host_hour=7.2",
             "--trainer.callbacks.cpu_tdp_w=10", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
             "--trainer.limit_test_batches=2", f"--trainer.default_root_dir={tmp_path}",
             "--trainer.enable_progress_bar=false"]
    fitted = _cli(ns, ["fit", *flags])
    ledger = next(c for c in fitted.trainer.callbacks if type(c).__name__ == "CostMonitor").ledger.path
    checkpoint = next((tmp_path / "lightning_logs").glob("version_0/checkpoints/*.ckpt"))
    _cli(ns, ["test", *flags, f"--ckpt_path={checkpoint}"])
    stages = [e for e in read_ledger(ledger).events if e.name == "stage_after_fit"]
    assert [e.stage for e in stages] == ["test"] and stages[0].usd > 0


def test_preset_config(ns, tmp_path):
    preset = preset_for(ns, PRESET.read_text(), tmp_path)
    cli = _cli(ns, ["fit", f"--config={preset}", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert any(type(c).__name__ == "CostMonitor" for c in cli.trainer.callbacks)


def test_presets_combine(ns, tmp_path):
    """``--config a.yaml --config b.yaml`` keeps both presets' callbacks (``callbacks+:`` appends), and a
    ``--trainer.callbacks.ARG`` flag after them sets the last one's argument."""
    cli = _cli(ns, ["fit", f"--config={PRESET}", "--trainer.callbacks.usd_per_host_hour=0.5",
                    f"--config={REPO / 'callbacks' / 'budget.yaml'}", "--trainer.callbacks.max_usd=3",
                    "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    mine = [c for c in cli.trainer.callbacks if type(c).__name__ in ("CostMonitor", "BudgetCap")]
    assert [type(c).__name__ for c in mine] == ["CostMonitor", "BudgetCap"]
    monitor, cap = mine
    assert monitor.prices.usd_per_host_hour == 0.5 and cap.meter is monitor.meter
    assert monitor.totals.usd > 0 and cli.trainer.global_step == 2


def test_bad_flag_fails_before_fit(ns, tmp_path, capsys):
    with pytest.raises((SystemExit, ValueError)) as error:
        _cli(ns, ["fit", f"--trainer.callbacks+={_class_path(ns)}", "--trainer.callbacks.usd_per_host_hour=-1",
                  f"--trainer.default_root_dir={tmp_path}"])
    assert "usd_per_host_hour must be >= 0" in str(error.value) + capsys.readouterr().err


def test_preset_country_gives_way_to_another_carbon_source_only_when_unset(ns, tmp_path, capsys):
    preset = preset_for(ns, PRESET.read_text(), tmp_path)
    common = [f"--config={preset}", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    with pytest.raises((SystemExit, ValueError)) as error:
        _cli(ns, ["fit", *common, "--trainer.callbacks.g_co2_per_kwh=50"])
    assert "g_co2_per_kwh and country/region are given together" in str(error.value) + capsys.readouterr().err
    cli = _cli(ns, ["fit", *common, "--trainer.callbacks.country=null", "--trainer.callbacks.g_co2_per_kwh=50"])
    monitor = next(c for c in cli.trainer.callbacks if type(c).__name__ == "CostMonitor")
    assert monitor.prices.carbon.g_co2_per_kwh == 50.0 and monitor.prices.carbon.source == "given by the user"


TRAIN_PY = textwrap.dedent("""
    import torch
    from {namespace}.cli import LightningCLI
    from {namespace}.demos.boring_classes import BoringModel

    class Model(BoringModel):
        def validation_step(self, batch, batch_idx):
            out = super().validation_step(batch, batch_idx)
            self.log("val_acc", torch.rand(()))
            return out

    if __name__ == "__main__":
        LightningCLI(Model)
""")


@pytest.mark.slow  # ten subprocesses (~2 min); the in-process tests above cover both CLIs by default
@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_readme_flag_and_every_preset_work_from_a_shell(namespace, tmp_path):
    """``python train.py fit --trainer.callbacks+=costaware.CostMonitor`` and each preset in
    callbacks/, with either package's LightningCLI, as a user runs them."""
    train = tmp_path / "train.py"
    train.write_text(TRAIN_PY.format(namespace=namespace))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    common = ["--trainer.max_steps=3", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
              "--trainer.enable_progress_bar=false", "--trainer.logger=false",
              "--trainer.enable_checkpointing=false"]
    price = "--trainer.callbacks.init_args.usd_per_host_hour=0.5"
    runs = {"flag": ["--trainer.callbacks+=costaware.CostMonitor", price]}
    for preset in sorted((REPO / "callbacks").glob("*.yaml")):
        runs[preset.stem] = [f"--config={preset}"] + ([price] if preset.stem == "budget" else [])
        if preset.stem == "marginal_gain":
            runs[preset.stem].append("--trainer.callbacks.monitor_kwargs={country: USA, usd_per_host_hour: 0.5}")
        if preset.stem == "online_probe":  # its labeled sets, where the preset names them; a monitor added
            (tmp_path / "data").mkdir()
            for split in ("train", "val"):
                torch.save((torch.randn(40, 32), torch.arange(40) % 2), tmp_path / "data" / f"probe_{split}.pt")
            # the presets combine; a flag sets the last callback added so far: the price follows its preset
            runs[preset.stem] = [f"--config={REPO / 'callbacks' / 'cost_monitor.yaml'}", price, *runs[preset.stem]]
    for name, args in runs.items():
        root = tmp_path / name
        done = subprocess.run([sys.executable, str(train), "fit", *args, *common, f"--trainer.default_root_dir={root}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
        assert list(root.rglob("ledger.jsonl")), name
