"""Small facts about torch modules that several parts of costaware ask."""

from __future__ import annotations

import torch


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else first buffer), or the CPU for an empty module.

    Used where a batch or a copy must follow the model; a model split across devices is moved
    by the caller, not here.
    """
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")
