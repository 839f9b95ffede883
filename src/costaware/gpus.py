"""The GPU models costaware knows by name, and how NVML's names map onto them.

Prices and peak-FLOPs tables are keyed by these model names. NVML reports names such as
``NVIDIA H100 80GB HBM3`` or ``NVIDIA A100-SXM4-80GB``; users type ``H100`` or ``a10g``. Both
resolve here, in one place, so that ``L40`` is never read as ``L4``.
"""

from __future__ import annotations

import re
from typing import Optional

KNOWN_MODELS = ("H100-SXM", "H100-PCIE", "H100-NVL", "H200", "H200-NVL", "A100", "L4", "L40", "L40S", "A10G", "T4")


def gpu_model(name: Optional[str]) -> Optional[str]:
    """Canonical model for a user- or NVML-given GPU name, or None if it is not known.

    A bare ``H100`` means the SXM part (the common cloud one), as NVML names the SXM part
    without a form factor (``NVIDIA H100 80GB HBM3``).
    """
    if not name:
        return None
    text = re.sub(r"[^A-Z0-9]+", " ", name.upper())
    tokens = set(text.split())
    joined = text.replace(" ", "")
    for chip in ("H200", "H100"):
        if chip in joined:
            if "NVL" in tokens or f"{chip}NVL" in joined:
                return f"{chip}-NVL"
            if chip == "H100" and ("PCIE" in tokens or "PCIE" in joined):
                return "H100-PCIE"
            return "H200" if chip == "H200" else "H100-SXM"
    if "A100" in joined:
        return "A100"
    if "A10G" in tokens or "A10G" in joined:
        return "A10G"
    if "L40S" in tokens:
        return "L40S"
    if "L40" in tokens:
        return "L40"
    if "L4" in tokens:
        return "L4"
    if "T4" in tokens:
        return "T4"
    return None
