"""Converting a float model's linear layers to 8 or 4 bits: bitsandbytes, or torch's dynamic int8.

* bitsandbytes: every ``nn.Linear`` becomes a ``bnb.nn.Linear8bitLt`` (LLM.int8() weights, int8
  per output row) or a ``bnb.nn.Linear4bit`` (NF4 or FP4 blocks of 64 weights); both run on CPU
  since bitsandbytes 0.47, and on CUDA.
* torch: ``torch.ao.quantization.quantize_dynamic`` (int8 weights, activations quantized on the
  fly by fbgemm/oneDNN kernels): CPU only, often faster than float32 on x86 where bitsandbytes'
  CPU kernels mostly save memory. torch marks ``torch.ao.quantization`` deprecated in favour of
  torchao; its notices are shown as they come.
"""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch
from torch import nn

BITS = (4, 8)
BACKENDS = ("bitsandbytes", "torch")


class QuantizationUnavailableError(ImportError):
    """bitsandbytes, which ``Quantize`` needs, cannot be imported."""


def import_bitsandbytes() -> Any:
    """Import bitsandbytes, or raise :class:`QuantizationUnavailableError` saying how to get it.

    On a CPU with AVX512-BF16, bitsandbytes >= 0.50 asks the ``kernels`` package (a dependency
    of transformers) for a 4-bit kernel from the Hugging Face hub when it is imported: a network
    call, which costaware never makes. ``kernels`` is hidden during the import, so bitsandbytes
    falls back to its own CPU kernel (its warning that the hub kernel failed is muted).
    """
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    muted = cpu_ops_log.disabled
    try:
        cpu_ops_log.disabled = True
        with warnings.catch_warnings(), _without_module("kernels"):
            warnings.simplefilter("ignore")  # "no GPU support" notices on CPU-only machines
            import bitsandbytes
    except ImportError as err:
        raise QuantizationUnavailableError(
            "Quantize needs bitsandbytes (>= 0.47 for CPU kernels), which cannot be imported: "
            "pip install costaware[quant]") from err
    finally:
        cpu_ops_log.disabled = muted
    return bitsandbytes


@contextmanager
def _without_module(name: str) -> Iterator[None]:
    """``import name`` raises ImportError for the duration (whether or not it was imported before)."""
    missing = object()
    before = sys.modules.get(name, missing)
    sys.modules[name] = None  # type: ignore[assignment]  # None in sys.modules: "import name" fails
    try:
        yield
    finally:
        if before is missing:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = before  # type: ignore[assignment]


def quantize_linear_layers(
    module: nn.Module,
    bits: int = 8,
    *,
    skip_modules: Sequence[str] = (),
    quant_type: str = "nf4",
    blocksize: int = 64,
    int8_threshold: float = 0.0,
) -> list[str]:
    """Replace, in place, the ``nn.Linear`` layers of a CPU module by bitsandbytes layers.

    The bitsandbytes way (load float weights into the layer, then move it to a device) is
    followed on CPU: the float weight goes into an ``Int8Params``/``Params4bit`` of a layer built
    on the meta device, and ``.to("cpu")`` quantizes it (bitsandbytes quantizes on the first
    move of an unquantized parameter). Biases stay float.

    Returns:
        The qualified names of the replaced layers.

    Example::

        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        quantize_linear_layers(model, bits=4)  # ['0', '2']
        # Reload a saved state_dict: quantize the same float architecture, then load_quantized.
    """
    bnb = import_bitsandbytes()
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if bits == 8:
        _drop_cast_notice()
    shared = _shared_weights(module)
    replaced = []
    for name, parent in list(module.named_modules()):
        if isinstance(parent, nn.MultiheadAttention):
            continue  # it reads out_proj.weight directly
        for child_name, child in list(parent.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            if not _quantizable(child, bnb) or _skipped(qualified, skip_modules) or id(child.weight) in shared:
                continue
            weight = child.weight.detach().to("cpu", torch.float32).contiguous()
            has_bias = child.bias is not None
            if bits == 8:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                            has_fp16_weights=False, threshold=int8_threshold, device="meta")
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                          compute_dtype=torch.float32, compress_statistics=False,
                                          quant_type=quant_type, device="meta")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize,
                                                 compress_statistics=False, quant_type=quant_type, module=layer)
            if has_bias:
                layer.bias = nn.Parameter(child.bias.detach().to("cpu", torch.float32), requires_grad=False)
            with _quiet():
                layer = layer.to("cpu")  # quantizes
            layer.train(child.training)
            setattr(parent, child_name, layer)
            replaced.append(qualified)
    return replaced


class _CastNotice(logging.Filter):
    """Drops bitsandbytes' "inputs will be cast to float16" notice, logged on every int8 forward
    of a float32 input: that cast is how LLM.int8() quantizes activations, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in str(record.msg)


def _drop_cast_notice() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _CastNotice) for f in logger.filters):
        logger.addFilter(_CastNotice())


def load_quantized(module: nn.Module, state_dict: Union[str, Path, dict], bits: int = 8, **kwargs: Any) -> nn.Module:
    """Rebuild a quantized model from its float architecture and a state_dict saved by ``Quantize``.

    ``module`` is a freshly built float model of the same architecture (its weights are
    overwritten); ``kwargs`` are the conversion's (``skip_modules``, ``quant_type``...), as when
    it was saved. Returns ``module``, quantized in place, on CPU.

    Example::

        model = load_quantized(MyModel(), "logs/version_0/costaware/quantized.pt", bits=8)
    """
    bnb = import_bitsandbytes()
    if not isinstance(state_dict, dict):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=False)
    module = module.to("cpu")
    quantize_linear_layers(module, bits, **kwargs)
    state_dict = dict(state_dict)  # type: ignore[arg-type]  # a dict by now (loaded above)
    for name, layer in module.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            prefix = f"{name}.weight" if name else "weight"
            stats = {k[len(prefix) + 1:]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + ".")}
            layer.weight = bnb.nn.Params4bit.from_prequantized(state_dict.pop(prefix), stats, device="cpu",
                                                               module=layer)
    module.load_state_dict(state_dict, strict=not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()))
    return module


def _quantizable(child: nn.Module, bnb: Any) -> bool:
    if not isinstance(child, nn.Linear) or isinstance(child, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
        return False
    if type(child).__name__ == "NonDynamicallyQuantizableLinear":
        return False
    return child.weight.is_floating_point() and child.weight.device.type != "meta"


def _skipped(name: str, skip_modules: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip_modules)


def _shared_weights(module: nn.Module) -> set:
    """ids of Linear weights that another module also holds (tied weights stay float)."""
    holders: dict = {}
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(id(sub))
    return {pid for pid, subs in holders.items() if len(subs) > 1}


def torch_dynamic_int8(module: nn.Module, skip_modules: Sequence[str] = ()) -> list[str]:
    """Replace, in place, the ``nn.Linear`` layers of a CPU module by torch's dynamic int8 layers.

    Returns the qualified names of the replaced layers (those in ``skip_modules``, inside
    ``nn.MultiheadAttention`` or sharing a weight stay float).
    """
    shared = _shared_weights(module)
    names = []
    for name, parent in list(module.named_modules()):
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for child_name, child in parent.named_children():
            qualified = f"{name}.{child_name}" if name else child_name
            if (type(child) is nn.Linear and child.weight.is_floating_point() and not _skipped(qualified, skip_modules)
                    and id(child.weight) not in shared):
                names.append(qualified)
    if names:
        torch.ao.quantization.quantize_dynamic(module, set(names), dtype=torch.qint8, inplace=True)
    return names


def torch_quantization_available() -> bool:
    """Whether this torch still has ``torch.ao.quantization.quantize_dynamic`` and an int8 CPU engine."""
    try:
        return (callable(torch.ao.quantization.quantize_dynamic)
                and torch.backends.quantized.engine in ("x86", "fbgemm", "qnnpack", "onednn"))
    except AttributeError:
        return False


def bitsandbytes_available() -> bool:
    try:
        import_bitsandbytes()
    except QuantizationUnavailableError:
        return False
    return True


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the notices of a throwaway Trainer and of bitsandbytes' CPU casts."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric",
                                              "lightning.fabric", "bitsandbytes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*inputs will be cast from.*")
            warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=r".*LightningModule.*has parameters that were not used.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
