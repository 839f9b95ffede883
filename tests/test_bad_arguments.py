"""Constructor gaps: each bad argument fails at construction, naming it and what it accepts."""

from datetime import timedelta

import pytest
import torch

from costaware import strategies

ONE_SOURCE = r"the grid's carbon intensity comes from one of them: g_co2_per_kwh .* country .* cloud_provider"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gpu": 123}, r"gpu must be a GPU model name \(a str such as 'H100'; known: H100-SXM.*\) or None, got 123"),
    ({"ledger_dir": 123}, r"ledger_dir must be a folder path \(a non-empty str or pathlib.Path\) or None, got 123"),
    ({"ledger_dir": ""}, r"ledger_dir must be a folder path"),
    ({"nvml_index": "0"}, r"nvml_index must be an int >= 0 or None, got '0'"),
    ({"flops_measure_batches": True}, r"flops_measure_batches must be an int >= 1, got True"),
    ({"country": 250}, r"country must be an ISO 3166 code such as 'USA' or 'FR' \(a str\) or None, got 250"),
    ({"g_co2_per_kwh": 300, "country": "USA"}, r"g_co2_per_kwh and country/region are given together"),
    ({"g_co2_per_kwh": 300, "cloud_provider": "gcp", "cloud_region": "us-central1"},
     r"g_co2_per_kwh and cloud_provider/cloud_region are given together"),
    ({"country": "USA", "cloud_provider": "gcp", "cloud_region": "us-central1"},
     r"country/region and cloud_provider/cloud_region are given together"),
    ({"country": "USA", "region": "CA", "cloud_region": "us-central1"}, ONE_SOURCE),
])
def test_cost_monitor(ns, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ns.costaware.CostMonitor(**kwargs)


def test_a_path_object_is_a_ledger_dir(ns, tmp_path):
    assert ns.costaware.CostMonitor(ledger_dir=tmp_path).meter.ledger_dir == tmp_path


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_time": "00:99:99:99"}, r"max_time='00:99:99:99' is not a 'DD:HH:MM:SS' duration: hours must be 00-23"),
    ({"max_time": "00:24:00:00"}, r"hours must be 00-23 and minutes and seconds 00-59"),
    ({"max_time": "00:00:60:00"}, r"hours must be 00-23 and minutes and seconds 00-59"),
    ({"caps": {"time": "00:00:00:60"}}, r"caps\['time'\]='00:00:00:60' is not a 'DD:HH:MM:SS' duration"),
    ({"max_usd": 5, "gpu": 123}, r"gpu must be a GPU model name"),
    ({"max_usd": 5, "country": "USA", "g_co2_per_kwh": 300}, ONE_SOURCE),
    ({"max_usd": 5, "ckpt_path": 7}, r"ckpt_path must be a folder path"),
    ({"max_usd": 5, "predictive": 1}, r"predictive must be True or False, got 1"),
])
def test_budget_cap(ns, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ns.costaware.BudgetCap(**kwargs)


@pytest.mark.parametrize(("max_time", "seconds"), [
    ("01:23:59:59", 172799.0), (timedelta(hours=30), 108000.0), ({"hours": 30}, 108000.0),
])
def test_budget_cap_takes_what_lightnings_timer_takes(ns, max_time, seconds):
    assert ns.costaware.BudgetCap(max_time=max_time).limits == {"max_time": seconds}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"then": "EarlyStop"}, r"then must hold costaware.strategies.StopStrategy objects"),
    ({"monitor_kwargs": []}, r"monitor_kwargs must be a dict of CostMonitor arguments, got \[\]"),
    ({"monitor_kwargs": {"country": "FRA", "g_co2_per_kwh": 50}}, ONE_SOURCE),
    ({"verbose": "yes"}, r"verbose must be True or False, got 'yes'"),
])
def test_marginal_gain_stopping(ns, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=1.0, **kwargs)


@pytest.mark.parametrize("strategy", ["EarlyStop", "Quantize"])
def test_a_strategy_class_instead_of_an_instance_is_named(ns, strategy):
    cls = getattr(strategies, strategy)  # strategies are not callbacks: one class for both namespaces
    with pytest.raises(ValueError, match=rf"then must hold strategy objects, got the class {strategy}: "
                                         rf"write then={strategy}\(...\)"):
        ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=1.0, then=cls)
    with pytest.raises(ValueError, match=rf"got the class {strategy}"):
        ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=1.0, then=[cls()] + [cls])


def test_online_probe_prog_bar_is_a_flag(ns):
    data = (torch.randn(8, 4), torch.tensor([0, 1] * 4))
    with pytest.raises(ValueError, match=r"prog_bar must be True or False, got 'no'"):
        ns.costaware.OnlineProbe(train=data, val=data, prog_bar="no")
