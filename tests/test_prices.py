"""Prices and carbon: the tables, the two billing modes, and errors that say what to do."""

import pytest

from costaware.prices import GPU_PRICES, carbon_intensity, make_prices


def test_every_default_price_has_a_source_and_date():
    for model, price in GPU_PRICES.items():
        assert price.usd_per_hour > 0 and price.source and price.as_of, model


def test_cloud_mode_pays_rental_not_energy():
    prices = make_prices(gpu="H100", usd_per_gpu_hour=2.5, usd_per_host_hour=0.5, usd_per_kwh=0.3, country="USA")
    assert prices.usd(gpu_hours=2.0, host_hours=1.0, kwh=10.0) == pytest.approx(5.5)


def test_on_prem_mode_pays_energy_with_pue_and_amortised_hardware():
    prices = make_prices(gpu="A100", mode="on_prem", usd_per_kwh=0.2, pue=1.5, usd_per_gpu_hour=0.4, g_co2_per_kwh=100)
    assert prices.usd(gpu_hours=10.0, host_hours=0.0, kwh=4.0) == pytest.approx(4.0 * 1.5 * 0.2 + 4.0)
    assert prices.co2_kg(4.0) == pytest.approx(4.0 * 1.5 * 100 / 1000)


def test_default_gpu_price_comes_from_the_table():
    prices = make_prices(gpu="NVIDIA A10G")
    assert prices.usd_per_gpu_hour == GPU_PRICES["A10G"].usd_per_hour
    assert "AWS g5.xlarge" in prices.usd_per_gpu_hour_source


@pytest.mark.parametrize(
    ("kwargs", "source"),
    [({"country": "FRA"}, "France"), ({"country": "fr"}, "France"), ({"country": "USA", "region": "texas"}, "texas"),
     ({"cloud_provider": "gcp", "cloud_region": "europe-west1"}, "gcp europe-west1"), ({"g_co2_per_kwh": 42}, "user"),
     ({}, "world average")],
)
def test_carbon_intensity_sources(kwargs, source):
    intensity = carbon_intensity(**kwargs)
    assert intensity.g_co2_per_kwh > 0 and source in intensity.source


def test_regions_need_a_country_and_providers_are_checked():
    with pytest.raises(ValueError, match="needs a country"):
        carbon_intensity(region="CA")
    with pytest.raises(ValueError, match="unknown cloud_provider 'ibm'"):
        carbon_intensity(cloud_provider="ibm", cloud_region="x")
    with pytest.raises(ValueError, match="unknown US region 'atlantis'"):
        carbon_intensity(country="USA", region="atlantis")

