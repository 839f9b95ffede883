"""The codecarbon adapter, against the installed release (scripts/test_versions runs it against
the oldest and the newest supported ones too)."""

import pytest

from costaware import _codecarbon


def test_bundled_tables_have_the_fields_read():
    mix = _codecarbon.data_json("private_infra/global_energy_mix.json")
    assert mix["FRA"]["carbon_intensity"] > 0 and mix["FRA"]["country_name"] == "France"
    world = _codecarbon.data_json("private_infra/carbon_intensity_per_source.json")
    assert world["world_average"] > 0
    usa = _codecarbon.data_json("private_infra/2023/usa_emissions.json")
    assert any(isinstance(row, dict) and "emissions" in row and "regionCode" in row for row in usa.values())
    rows = _codecarbon.data_csv("cloud/impact.csv")
    assert rows and {"provider", "region", "impact", "source"} <= set(rows[0])


def test_cpu_model_with_a_given_tdp_measures_power_and_energy(tmp_path):
    cpu, method = _codecarbon.open_cpu(str(tmp_path), tdp_w=65)
    assert "65" in method
    power_w, energy_j = _codecarbon.cpu_power_and_energy(cpu, 2.0)
    assert 0 < power_w <= 65 and energy_j == pytest.approx(power_w * 2.0, rel=0.05)


def test_ram_power_given():
    assert _codecarbon.ram_power_w(_codecarbon.open_ram(3.0)) == pytest.approx(3.0)
