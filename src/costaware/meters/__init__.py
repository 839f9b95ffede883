"""Reading the machine: GPU via NVML, host CPU/RAM via codecarbon, FLOPs via torch.

Every meter has a null object (``EmptyGPU``, ``EmptyHost``) for missing hardware, so callers
never branch on ``if gpu:``. A meter that fails says so in its ``status`` and keeps its last
readings; it never raises into training.
"""

from costaware.meters.flops import PEAK_FLOPS_PER_S, FlopsCounter, peak_flops_per_s
from costaware.meters.gpu import EmptyGPU, GPUMeter, GPUSample, open_gpu
from costaware.meters.host import EmptyHost, HostMeter, HostSample, open_host
from costaware.meters.sampler import Sampler

__all__ = [
    "PEAK_FLOPS_PER_S",
    "EmptyGPU",
    "EmptyHost",
    "FlopsCounter",
    "GPUMeter",
    "GPUSample",
    "HostMeter",
    "HostSample",
    "Sampler",
    "open_gpu",
    "open_host",
    "peak_flops_per_s",
]
