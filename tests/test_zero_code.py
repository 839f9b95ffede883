"""Zero-code attach through Lightning's callbacks_factory entry points, in a subprocess as a user runs it."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from costaware.ledger import read_ledger
from costaware.zero_code import settings_from_environment

_SCRIPT = textwrap.dedent("""
    import sys
    from {ns} import Trainer
    from {ns}.demos.boring_classes import BoringModel

    trainer = Trainer(max_steps=4, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=sys.argv[1])
    print("CALLBACKS", sorted(type(cb).__module__ + "." + type(cb).__name__ for cb in trainer.callbacks))
    trainer.fit(BoringModel())
""")


def _run(tmp_path, namespace, **env):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT.format(ns=namespace))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COSTAWARE")}
    return subprocess.run([sys.executable, str(script), str(tmp_path / "logs")], capture_output=True, text=True,
                          timeout=180, env={**clean, **env})


def _ledgers(tmp_path):
    return list((tmp_path / "logs").rglob("ledger.jsonl"))


def test_a_trainer_built_with_the_environment_gets_the_callbacks(ns, monkeypatch):
    # In process, through the real entry points Lightning reads when a Trainer is built.
    for name in [n for n in os.environ if n.startswith("COSTAWARE")]:
        monkeypatch.delenv(name)
    assert not any(type(cb).__name__ == "CostMonitor" for cb in ns.Trainer(logger=False).callbacks)
    monkeypatch.setenv("COSTAWARE", "1")
    monkeypatch.setenv("COSTAWARE_USD_PER_HOST_HOUR", "0.3")
    assert [cb for cb in ns.Trainer(logger=False).callbacks if isinstance(cb, ns.costaware.CostMonitor)]
    monkeypatch.setenv("COSTAWARE_MAX_USD", "2")
    (cap,) = [cb for cb in ns.Trainer(logger=False).callbacks if isinstance(cb, ns.costaware.BudgetCap)]
    assert cap.limits == {"max_usd": 2.0}


def test_a_trainer_with_a_costaware_callback_in_code_keeps_it(ns, monkeypatch):
    """COSTAWARE=1 with a CostMonitor (or a cap) already in the script: one meter, the script's,
    and a warning; not Lightning's "more than one stateful callback" error."""
    monkeypatch.setenv("COSTAWARE", "1")
    monkeypatch.setenv("COSTAWARE_USD_PER_HOST_HOUR", "0.3")
    in_code_callbacks = (ns.costaware.CostMonitor(usd_per_host_hour=1.0),
                         ns.costaware.BudgetCap(max_usd=5, usd_per_host_hour=1.0))
    for in_code in in_code_callbacks:
        with pytest.warns(RuntimeWarning, match=f"already has {type(in_code).__name__} in code"):
            trainer = ns.Trainer(logger=False, callbacks=[in_code])
        ours = [cb for cb in trainer.callbacks if type(cb).__module__.startswith("costaware.")]
        assert ours == [in_code]
    # Without one in code (an OnlineProbe only reads a meter), the environment's callback is still added.
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    probe = ns.costaware.OnlineProbe(train=(x, y), val=(x, y), embed_fn=lambda module, inputs: inputs)
    added = ns.Trainer(logger=False, callbacks=[probe]).callbacks
    assert [cb for cb in added if isinstance(cb, ns.costaware.CostMonitor)]


def test_a_cap_from_the_environment_is_kept_with_a_meter_in_code(ns, monkeypatch):
    """COSTAWARE_MAX_USD with a CostMonitor in the script: the cap is still enforced (a BudgetCap
    that reads the script's meter), the environment's price is not applied; with a BudgetCap in
    code, that one applies and the environment adds nothing."""
    monkeypatch.setenv("COSTAWARE_MAX_USD", "5")
    monkeypatch.setenv("COSTAWARE_USD_PER_HOST_HOUR", "0.3")
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=1.0)
    with pytest.warns(RuntimeWarning, match="COSTAWARE_USD_PER_HOST_HOUR not applied"):
        trainer = ns.Trainer(logger=False, callbacks=[monitor])
    (cap,) = [cb for cb in trainer.callbacks if isinstance(cb, ns.costaware.BudgetCap)]
    assert cap.limits == {"max_usd": 5.0} and not [cb for cb in trainer.callbacks
                                                   if isinstance(cb, ns.costaware.CostMonitor) and cb is not monitor]
    mine = ns.costaware.BudgetCap(max_usd=1, usd_per_host_hour=1.0)
    with pytest.warns(RuntimeWarning, match="the BudgetCap in code applies"):
        trainer = ns.Trainer(logger=False, callbacks=[mine])
    assert [cb for cb in trainer.callbacks if isinstance(cb, ns.costaware.BudgetCap)] == [mine]


def test_a_trainer_costaware_builds_itself_gets_nothing_from_the_environment(ns, monkeypatch):
    """Distill's student Trainer (built inside costaware.strategies) is not the user's script's run."""
    monkeypatch.setenv("COSTAWARE", "1")
    code = "def build(Trainer):\n    return Trainer(logger=False)\n"
    scope = {"__name__": "costaware.strategies.student_fit"}
    exec(compile(code, "<student>", "exec"), scope)
    trainer = scope["build"](ns.Trainer)
    assert not [cb for cb in trainer.callbacks if isinstance(cb, ns.costaware.CostMonitor)]


@pytest.mark.slow  # subprocess fits (~10 s each): CI runs -m slow
@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_nothing_happens_without_the_environment(tmp_path, namespace):
    result = _run(tmp_path, namespace, COSTAWARE_USD_PER_HOST_HOUR="0.2")  # a price alone switches nothing on
    assert result.returncode == 0, result.stderr[-2000:]
    assert "costaware" not in result.stdout.split("CALLBACKS")[1].split("\n")[0]
    assert _ledgers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_costaware_1_meters_an_unchanged_script(tmp_path, namespace):
    result = _run(tmp_path, namespace, COSTAWARE="1", COSTAWARE_USD_PER_HOST_HOUR="0.2", COSTAWARE_COUNTRY="FRA")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "costaware.callbacks.cost_monitor.CostMonitor" in result.stdout
    (ledger,) = _ledgers(tmp_path)
    contents = read_ledger(ledger)
    assert contents.header["prices"]["usd_per_host_hour"] == 0.2
    assert contents.end["totals"]["usd"] > 0


@pytest.mark.slow
def test_a_max_usd_adds_a_cap(tmp_path):
    result = _run(tmp_path, "pytorch_lightning", COSTAWARE_MAX_USD="5", COSTAWARE_USD_PER_HOST_HOUR="0.2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "costaware.callbacks.budget_cap.BudgetCap" in result.stdout
    (ledger,) = _ledgers(tmp_path)
    caps = [e for e in read_ledger(ledger).events if e["name"] == "budget_caps"]
    assert caps and caps[0]["caps"] == {"max_usd": 5.0}


@pytest.mark.slow
def test_a_misspelt_variable_fails_before_compute_naming_it(tmp_path):
    result = _run(tmp_path, "pytorch_lightning", COSTAWARE="1", COSTAWARE_MAX_DOLLARS="5")
    assert result.returncode != 0
    assert "COSTAWARE_MAX_DOLLARS is not a costaware setting" in result.stderr
    assert _ledgers(tmp_path) == []


@pytest.mark.parametrize("env, message", [
    ({"COSTAWARE": "maybe"}, "COSTAWARE='maybe'"),
    ({"COSTAWARE_MAX_USD": "five"}, "COSTAWARE_MAX_USD='five' is not a valid float"),
])
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        settings_from_environment(env)


def test_costaware_0_turns_everything_off():
    assert settings_from_environment({"COSTAWARE": "0", "COSTAWARE_MAX_USD": "5"}) is None
    assert settings_from_environment({"COSTAWARE": "1"}) == {}
