"""Training FLOPs counted on real batches, and the peak rates that turn them into MFU.

Counting runs the real forward and backward under torch's ``FlopCounterMode`` (what Lightning's
``measure_flops`` uses), so LoRA's frozen weights, which get no weight gradient, are counted
right. Only the first few batches are counted; later batches reuse their mean, so the hot path
pays nothing. A ``LightningModule`` that defines ``flops_per_batch`` (Lightning's
``ThroughputMonitor`` convention) is trusted instead.
"""

from __future__ import annotations

from typing import Any, Optional

from costaware.gpus import gpu_model

# Dense (no structured sparsity) peak FLOP/s per GPU, by compute format. Sources: NVIDIA data
# sheets, whose tensor figures are quoted "with sparsity" and are halved here:
# H100/H200: nvidia.com H100 datasheet (2023) and H200 datasheet (2024); A100: A100 datasheet
# r4; L4, L40, L40S: their product briefs / datasheets (2023); T4: T4 datasheet; A10G: AWS G5
# documentation (the A10G runs tensor math at about half the A10's rate).
PEAK_FLOPS_PER_S: dict[str, dict[str, float]] = {
    "H100-SXM": {"fp64": 33.5e12, "fp32": 66.9e12, "tf32": 494.7e12,
                 "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
    "H100-PCIE": {"fp64": 25.6e12, "fp32": 51.2e12, "tf32": 378.0e12,
                  "bf16": 756.0e12, "fp16": 756.0e12, "fp8": 1513.0e12},
    "H100-NVL": {"fp64": 30.0e12, "fp32": 60.0e12, "tf32": 417.5e12,
                 "bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12},
    "H200": {"fp64": 34.0e12, "fp32": 67.0e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
    "H200-NVL": {"fp64": 30.0e12, "fp32": 60.0e12, "tf32": 417.5e12,
                 "bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12},
    "A100": {"fp64": 9.7e12, "fp32": 19.5e12, "tf32": 156.0e12, "bf16": 312.0e12, "fp16": 312.0e12},
    "L4": {"fp32": 30.3e12, "tf32": 60.0e12, "bf16": 121.0e12, "fp16": 121.0e12, "fp8": 242.0e12},
    "L40": {"fp32": 90.5e12, "tf32": 90.5e12, "bf16": 181.0e12, "fp16": 181.0e12, "fp8": 362.0e12},
    "L40S": {"fp32": 91.6e12, "tf32": 183.0e12, "bf16": 362.0e12, "fp16": 362.0e12, "fp8": 733.0e12},
    "A10G": {"fp32": 31.2e12, "tf32": 35.0e12, "bf16": 70.0e12, "fp16": 70.0e12},
    "T4": {"fp32": 8.1e12, "fp16": 65.0e12},
}


def compute_format(precision: str, float32_matmul_precision: str = "highest") -> str:
    """The tensor format that bounds a Lightning ``precision`` setting's matmuls."""
    text = str(precision)
    if "bf16" in text:
        return "bf16"
    if text.startswith("16"):
        return "fp16"
    if text.startswith("64"):
        return "fp64"
    if "transformer-engine" in text:
        return "fp8"
    return "fp32" if float32_matmul_precision == "highest" else "tf32"


def peak_flops_per_s(gpu_name: Optional[str], precision: str = "32-true",
                     float32_matmul_precision: str = "highest") -> Optional[float]:
    """Dense peak FLOP/s of one GPU at a precision, or None when unknown (MFU is then not logged)."""
    model = gpu_model(gpu_name)
    if model is None:
        return None
    return PEAK_FLOPS_PER_S[model].get(compute_format(precision, float32_matmul_precision))


class FlopsCounter:
    """Cumulative training FLOPs of one rank.

    Args:
        measure_batches: how many batches to count with ``FlopCounterMode``; later batches are
            assumed to cost the mean of those.
        skip_batches: batches to let pass first (lazy initialisation, compilation).
    """

    def __init__(self, measure_batches: int = 3, skip_batches: int = 1) -> None:
        if measure_batches < 1:
            raise ValueError(f"flops_measure_batches must be >= 1, got {measure_batches!r}")
        self.measure_batches = measure_batches
        self.skip_batches = skip_batches
        self._measured_flops: list[float] = []
        self._estimated_batches = 0
        self._declared_flops = 0.0
        self._mode: Any = None
        self._declares: Optional[bool] = None
        self.source = "FlopCounterMode on real batches"
        self.failed: Optional[str] = None

    @property
    def flops_per_batch(self) -> Optional[float]:
        if not self._measured_flops:
            return None
        return sum(self._measured_flops) / len(self._measured_flops)

    @property
    def total_flops(self) -> float:
        per_batch = self.flops_per_batch or 0.0
        return self._declared_flops + sum(self._measured_flops) + per_batch * self._estimated_batches

    def batch_start(self, pl_module: Any, batch_idx_in_run: int) -> None:
        if self._declares is None:  # asked once: a failed attribute lookup on nn.Module is slow
            self._declares = getattr(pl_module, "flops_per_batch", None) is not None
        if self._declares or self.failed is not None or len(self._measured_flops) >= self.measure_batches:
            return
        if self.skip_batches <= batch_idx_in_run:
            try:
                from torch.utils.flop_counter import FlopCounterMode

                self._mode = FlopCounterMode(display=False)
                self._mode.__enter__()
            except Exception as err:  # noqa: BLE001 - counting is optional, training is not
                self.failed, self._mode = f"FlopCounterMode failed ({err})", None

    def batch_end(self, pl_module: Any) -> None:
        if self._declares:
            self.source = "the module's flops_per_batch"
            self._declared_flops += float(pl_module.flops_per_batch)
            return
        if self._mode is not None:
            mode, self._mode = self._mode, None
            try:
                mode.__exit__(None, None, None)
                self._measured_flops.append(float(mode.get_total_flops()))
            except Exception as err:  # noqa: BLE001
                self.failed = f"FlopCounterMode failed ({err})"
        else:
            self._estimated_batches += 1

    def abort(self) -> None:
        """Leave the counting mode if a batch raised inside it."""
        if self._mode is not None:
            mode, self._mode = self._mode, None
            try:
                mode.__exit__(None, None, None)
            except Exception:  # noqa: BLE001
                pass
