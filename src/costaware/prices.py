"""Turning readings into dollars and carbon, offline.

GPU rental prices come from a small default table (each figure with its source and date, always
overridable); grid carbon intensity comes from codecarbon's bundled tables (by country, US
state, or cloud region) or from the user. Nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from costaware import _codecarbon
from costaware.gpus import KNOWN_MODELS, gpu_model
from costaware.validation import check_amount, check_text


@dataclass(frozen=True)
class GPUPrice:
    """A GPU's on-demand rental price, per GPU.

    Attributes:
        usd_per_hour: dollars per GPU-hour.
        source: where the figure comes from (instance price / GPUs per instance where so).
        as_of: when the figure was read.
    """

    usd_per_hour: float
    source: str
    as_of: str


# On-demand list prices; single-GPU cloud instances include their host share. These move
# often: give ``usd_per_gpu_hour`` for your own contract.
GPU_PRICES: dict[str, GPUPrice] = {
    "H100-SXM": GPUPrice(2.99, "Lambda Cloud on-demand, 8x H100 SXM instance, per GPU", "2025-06"),
    "H100-PCIE": GPUPrice(2.49, "Lambda Cloud on-demand, 1x H100 PCIe instance", "2025-06"),
    "A100": GPUPrice(1.79, "Lambda Cloud on-demand, 8x A100 SXM 80GB instance, per GPU", "2025-06"),
    "A10G": GPUPrice(1.006, "AWS g5.xlarge on-demand, us-east-1 (1x A10G, 4 vCPU)", "2025-06"),
    "L4": GPUPrice(0.7068, "Google Cloud g2-standard-4 on-demand, us-central1 (1x L4, 4 vCPU)", "2025-06"),
    "L40S": GPUPrice(1.861, "AWS g6e.xlarge on-demand, us-east-1 (1x L40S, 4 vCPU)", "2025-06"),
    "T4": GPUPrice(0.526, "AWS g4dn.xlarge on-demand, us-east-1 (1x T4, 4 vCPU)", "2025-06"),
}

MODES = ("cloud", "on_prem")


@dataclass(frozen=True)
class CarbonIntensity:
    """Grid carbon intensity.

    Attributes:
        g_co2_per_kwh: grams of CO2-equivalent per kWh drawn from the grid.
        source: the table or person that gave it.
    """

    g_co2_per_kwh: float
    source: str


@dataclass(frozen=True)
class Prices:
    """Everything needed to price a run.

    In ``cloud`` mode you pay the rental (GPU-hours and host-hours); energy is reported for
    carbon only. In ``on_prem`` mode you pay the energy (kWh x PUE x $/kWh) plus optional
    amortised hardware per GPU-hour and per host-hour.
    """

    mode: str
    gpu_model: Optional[str]
    usd_per_gpu_hour: float
    usd_per_gpu_hour_source: str
    usd_per_host_hour: float
    usd_per_kwh: float
    pue: float
    carbon: CarbonIntensity

    def usd(self, gpu_hours: float, host_hours: float, kwh: float) -> float:
        """Dollars for GPU-hours, host-hours and kWh measured at the device (before PUE)."""
        usd = gpu_hours * self.usd_per_gpu_hour + host_hours * self.usd_per_host_hour
        if self.mode == "on_prem":
            usd += kwh * self.pue * self.usd_per_kwh
        return usd

    def co2_kg(self, kwh: float) -> float:
        """Kilograms of CO2-eq for kWh measured at the device: kWh x PUE x grid intensity."""
        return kwh * self.pue * self.carbon.g_co2_per_kwh / 1000.0

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "gpu_model": self.gpu_model,
            "usd_per_gpu_hour": self.usd_per_gpu_hour,
            "usd_per_gpu_hour_source": self.usd_per_gpu_hour_source,
            "usd_per_host_hour": self.usd_per_host_hour,
            "usd_per_kwh": self.usd_per_kwh,
            "pue": self.pue,
            "g_co2_per_kwh": self.carbon.g_co2_per_kwh,
            "carbon_source": self.carbon.source,
        }


def gpu_price(gpu: Optional[str], usd_per_gpu_hour: Optional[float],
              mode: str = "cloud") -> tuple[Optional[str], float, str]:
    """Resolve a GPU's $/GPU-hour: the user's figure, else the default table, else an error.

    Returns ``(model, usd_per_gpu_hour, source)``. In ``on_prem`` mode the GPU-hour figure is
    amortised hardware and defaults to 0.
    """
    check_text("gpu", gpu, f"a GPU model name (a str such as 'H100'; known: {', '.join(KNOWN_MODELS)})")
    model = gpu_model(gpu)
    if usd_per_gpu_hour is not None:
        return model, check_amount("usd_per_gpu_hour", usd_per_gpu_hour), "given by the user"
    if gpu is None or mode == "on_prem":
        return model, 0.0, "none (no GPU price applies)" if gpu is None else "on-prem: no amortised hardware given"
    if model in GPU_PRICES:
        price = GPU_PRICES[model]
        return model, price.usd_per_hour, f"{price.source} (as of {price.as_of})"
    priced = ", ".join(sorted(GPU_PRICES))
    raise ValueError(
        f"no default price for GPU {gpu!r} (known models: {', '.join(KNOWN_MODELS)}; with a default "
        f"price: {priced}). Give one with usd_per_gpu_hour=... (LightningCLI: "
        f"--trainer.callbacks.usd_per_gpu_hour=...)."
    )


def carbon_intensity(
    country: Optional[str] = None,
    region: Optional[str] = None,
    cloud_provider: Optional[str] = None,
    cloud_region: Optional[str] = None,
    g_co2_per_kwh: Optional[float] = None,
) -> CarbonIntensity:
    """Grid intensity from the user, a cloud region, a US state, a country, or the world average.

    These are alternatives: two of them together is an error rather than one silently winning.
    """
    _check_one_carbon_source(country, region, cloud_provider, cloud_region, g_co2_per_kwh)
    if g_co2_per_kwh is not None:
        return CarbonIntensity(check_amount("g_co2_per_kwh", g_co2_per_kwh), "given by the user")
    if cloud_provider is not None or cloud_region is not None:
        return _cloud_intensity(cloud_provider, cloud_region)
    if country is not None:
        iso3 = _iso3(country)
        if region is not None:
            return _region_intensity(iso3, region)
        mix = _json("private_infra/global_energy_mix.json")[iso3]
        return CarbonIntensity(float(mix["carbon_intensity"]),
                               f"codecarbon global_energy_mix, {mix['country_name']} ({mix.get('year', 'n/a')})")
    if region is not None:
        raise ValueError(f"region={region!r} needs a country (e.g. country='USA', region='CA')")
    world = _json("private_infra/carbon_intensity_per_source.json")
    return CarbonIntensity(float(world["world_average"]),
                           "world average (IEA 2019, codecarbon); give country= for your grid")


def _check_one_carbon_source(country: Optional[str], region: Optional[str], cloud_provider: Optional[str],
                             cloud_region: Optional[str], g_co2_per_kwh: Optional[float]) -> None:
    """The carbon arguments are names (text), and at most one source of the intensity is given."""
    for name, value in (("country", country), ("region", region), ("cloud_provider", cloud_provider),
                        ("cloud_region", cloud_region)):
        check_text(name, value, f"{_CARBON_ACCEPTED[name]} (a str)")
    sources = {"g_co2_per_kwh": g_co2_per_kwh is not None,
               "country/region": country is not None or region is not None,
               "cloud_provider/cloud_region": cloud_provider is not None or cloud_region is not None}
    given = [name for name, present in sources.items() if present]
    if len(given) > 1:
        raise ValueError(
            f"{' and '.join(given)} are given together, but the grid's carbon intensity comes from one of them: "
            "g_co2_per_kwh (your own figure), country (with region for a US state), or cloud_provider with "
            "cloud_region. Give only one.")


_CARBON_ACCEPTED = {"country": "an ISO 3166 code such as 'USA' or 'FR'", "region": "a US state such as 'CA'",
                    "cloud_provider": "a provider such as 'gcp', 'aws' or 'azure'",
                    "cloud_region": "a cloud region such as 'us-central1'"}


def _json(relative: str) -> dict:
    return _codecarbon.data_json(relative)


def _iso3(country: str) -> str:
    mix = _json("private_infra/global_energy_mix.json")
    code = str(country).strip().upper()
    if code in mix:
        return code
    try:
        import pycountry

        found = pycountry.countries.get(alpha_2=code) if len(code) == 2 else pycountry.countries.lookup(country)
        if found is not None and found.alpha_3 in mix:
            return found.alpha_3
    except (ImportError, LookupError):
        pass
    raise ValueError(
        f"unknown country {country!r}: give an ISO 3166 code with a carbon figure in codecarbon's "
        f"table, e.g. 'USA', 'FRA', 'DEU', 'GBR' ({len(mix)} known; `costaware prices` lists them), "
        f"or g_co2_per_kwh=..."
    )


def _region_intensity(iso3: str, region: str) -> CarbonIntensity:
    if iso3 != "USA":
        raise ValueError(f"region={region!r}: regions are known for country='USA' (US states) only; "
                         "use g_co2_per_kwh=... otherwise")
    table = _json("private_infra/2023/usa_emissions.json")
    key = str(region).strip().lower()
    for name, row in table.items():
        if name.startswith("_"):
            continue
        if key in (name, str(row.get("regionCode", "")).lower()):
            g_per_kwh = float(row["emissions"]) * 0.453592  # lbs/MWh -> g/kWh
            return CarbonIntensity(g_per_kwh, f"EPA eGRID2023 via codecarbon, {name}")
    raise ValueError(f"unknown US region {region!r}: give a state name or two-letter code, e.g. 'CA' or 'texas'")


def cloud_regions() -> list[dict]:
    """Codecarbon's cloud-region table: provider, region, impact (gCO2/kWh), source."""
    return _codecarbon.data_csv("cloud/impact.csv")


def _cloud_intensity(provider: Optional[str], region: Optional[str]) -> CarbonIntensity:
    rows = cloud_regions()
    providers = sorted({r["provider"] for r in rows})
    if provider is None or region is None:
        raise ValueError(f"cloud_provider and cloud_region go together (providers: {', '.join(providers)})")
    matches = [r for r in rows if r["provider"] == str(provider).lower() and r["region"] == region]
    if not matches:
        if str(provider).lower() not in providers:
            raise ValueError(f"unknown cloud_provider {provider!r}; known: {', '.join(providers)}")
        known = sorted(r["region"] for r in rows if r["provider"] == str(provider).lower())
        raise ValueError(f"unknown cloud_region {region!r} for {provider}; known: {', '.join(known)}")
    row = matches[0]
    return CarbonIntensity(float(row["impact"]), f"codecarbon cloud table, {provider} {region} ({row['source']})")


def make_prices(
    gpu: Optional[str] = None,
    usd_per_gpu_hour: Optional[float] = None,
    usd_per_host_hour: float = 0.0,
    usd_per_kwh: Optional[float] = None,
    pue: float = 1.0,
    mode: str = "cloud",
    country: Optional[str] = None,
    region: Optional[str] = None,
    cloud_provider: Optional[str] = None,
    cloud_region: Optional[str] = None,
    g_co2_per_kwh: Optional[float] = None,
) -> Prices:
    """Validate every price argument and resolve the tables, failing before any compute."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_amount("usd_per_host_hour", usd_per_host_hour)
    check_amount("pue", pue, minimum=1.0)
    check_amount("usd_per_kwh", usd_per_kwh, allow_none=True)
    if mode == "on_prem" and usd_per_kwh is None:
        raise ValueError("mode='on_prem' needs usd_per_kwh=... (what you pay per kWh)")
    model, gpu_usd, source = gpu_price(gpu, usd_per_gpu_hour, mode)
    return Prices(
        mode=mode,
        gpu_model=model or gpu,
        usd_per_gpu_hour=gpu_usd,
        usd_per_gpu_hour_source=source,
        usd_per_host_hour=float(usd_per_host_hour),
        usd_per_kwh=float(usd_per_kwh or 0.0),
        pue=float(pue),
        carbon=carbon_intensity(country, region, cloud_provider, cloud_region, g_co2_per_kwh),
    )
