"""Every use of codecarbon's internals, in one place.

costaware uses codecarbon offline, below its public ``EmissionsTracker``: its hardware classes
for the host's CPU and RAM energy (``codecarbon.external``, ``codecarbon.core``) and its bundled
data tables (carbon intensity by country, US state and cloud region). Neither is a public API,
so each use sits behind a function here, tested by ``tests/test_codecarbon_adapter.py`` against
the oldest and newest supported releases (``scripts/test_versions``); pyproject bounds
codecarbon below its next minor release for this.
"""

from __future__ import annotations

import csv
import json
import logging
from importlib import resources
from typing import Any, Optional


def data_json(relative: str) -> dict:
    """A JSON table bundled in codecarbon's ``data/`` folder (``"private_infra/global_energy_mix.json"``)."""
    with resources.files("codecarbon").joinpath("data", *relative.split("/")).open(encoding="utf-8") as f:
        return json.load(f)


def data_csv(relative: str) -> list[dict]:
    """A CSV table bundled in codecarbon's ``data/`` folder, as rows keyed by its header."""
    with resources.files("codecarbon").joinpath("data", *relative.split("/")).open(encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def open_cpu(out_dir: str, tdp_w: Optional[float]) -> tuple[Any, str]:
    """codecarbon's CPU energy model, started: RAPL counters where readable and no TDP is given,
    else TDP x load (the TDP detected once per process unless given). Returns it and how it measures."""
    from codecarbon.core import cpu as cc_cpu
    from codecarbon.core.hardware_cache import get_cached_tdp
    from codecarbon.external.hardware import CPU, MODE_CPU_LOAD

    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    if tdp_w is None and cc_cpu.is_rapl_available():
        cpu = CPU.from_utils(out_dir, mode="intel_rapl")
        method = "RAPL counters (codecarbon)"
    else:
        if tdp_w is None:
            tdp = get_cached_tdp(cc_cpu)  # detected once per process
            model, tdp_w = tdp.model, tdp.tdp
        else:
            model = "user-given TDP"
        cpu = CPU.from_utils(out_dir, MODE_CPU_LOAD, model, tdp_w)  # type: ignore[arg-type]  # watts: a float
        method = f"codecarbon TDP x load model ({model}, {tdp_w} W TDP)"
    cpu.start()
    return cpu, method


def open_ram(ram_power_w: Optional[float]) -> Any:
    """codecarbon's RAM power model for the whole machine (or the power given, watts)."""
    from codecarbon.external.ram import RAM

    return RAM(tracking_mode="machine", force_ram_power=ram_power_w)  # type: ignore[arg-type]  # watts: a float


def cpu_power_and_energy(cpu: Any, dt_s: float) -> tuple[float, float]:
    """``(power_w, energy_j)`` of the CPU over the last ``dt_s`` seconds."""
    power, energy = cpu.measure_power_and_energy(last_duration=dt_s)
    return float(power.W), float(energy.kWh) * 3.6e6


def ram_power_w(ram: Any) -> float:
    """The RAM's current power estimate, watts."""
    return float(ram.total_power().W)
