"""CostMonitor from LightningCLI flags and from the preset in callbacks/, in both namespaces."""

from importlib import import_module
from pathlib import Path

import pytest

from conftest import preset_for

PRESET = Path(__file__).resolve().parents[1] / "callbacks" / "cost_monitor.yaml"


def _cli(ns, args):
    cli = import_module(f"{ns.name}.cli")
    return cli.LightningCLI(ns.BoringModel, args=args, save_config_kwargs={"overwrite": True})


def _class_path(ns):
    return "costaware.lightning.CostMonitor" if ns.name == "lightning.pytorch" else "costaware.CostMonitor"


def test_flags_add_cost_monitor(ns, tmp_path):
    cli = _cli(ns, ["fit", f"--trainer.callbacks+={_class_path(ns)}", "--trainer.callbacks.usd_per_host_hour=7.2",
                    "--trainer.callbacks.country=DEU", "--trainer.callbacks.cpu_tdp_w=10", "--trainer.max_steps=3",
                    "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.enable_progress_bar=false"])
    monitors = [c for c in cli.trainer.callbacks if type(c).__name__ == "CostMonitor"]
    assert len(monitors) == 1
    assert monitors[0].prices.usd_per_host_hour == 7.2 and "Germany" in monitors[0].prices.carbon.source
    assert monitors[0].totals.usd > 0 and cli.trainer.global_step == 3


def test_preset_config(ns, tmp_path):
    preset = preset_for(ns, PRESET.read_text(), tmp_path)
    cli = _cli(ns, ["fit", f"--config={preset}", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert any(type(c).__name__ == "CostMonitor" for c in cli.trainer.callbacks)


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
