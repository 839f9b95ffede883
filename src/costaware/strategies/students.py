"""Students made from the teacher itself: a copy with fewer transformer layers.

A student that starts from the teacher's own weights needs far less data and training to match
it than one that starts from scratch (DistilBERT, Sanh et al. 2019, initialises its 6 layers
from every second layer of BERT's 12). :class:`TruncatedStudent` is ``Distill``'s default
student: a copy of the trained teacher (its LoRA or other peft adapters merged into the
weights) whose stack of transformer layers is cut to ``layers`` of them, the teacher's head and
embeddings kept. It is called like the teacher and returns logits of the same shape, so it
meets ``Distill``'s student contract by construction.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import nn

from costaware.strategies.base import cpu_copy


class NoLayerStackError(ValueError):
    """The teacher has no stack of repeated layers to truncate: give ``Distill`` a student."""


class TruncatedStudent:
    """``student = TruncatedStudent(layers=2)(teacher)``: the teacher with fewer layers.

    The layer stack is the longest ``nn.ModuleList`` whose entries are all of one type (BERT's
    ``encoder.layer``, a ViT's ``blocks``...). Any ``config.num_hidden_layers`` (Hugging Face)
    is set to the new depth. Every parameter of the copy trains (adapters are merged first, so
    the student is a plain model, fully fine-tuned by distillation).

    Args:
        layers: how many layers to keep, spread evenly from the first to the last (2 of 6 keeps
            layers 0 and 5, 3 keeps 0, 2 and 5: see :meth:`indices`), or the exact indices to keep.

    Raises:
        ValueError: at construction, for a count < 1 or bad indices; at the call
            (:class:`NoLayerStackError`) for a teacher without a layer stack, or indices out of
            its range.

    Example::

        from costaware.strategies import Distill, TruncatedStudent

        Distill(student=TruncatedStudent(layers=2), temperature=2.0)   # the default student
        student = TruncatedStudent(layers=[0, 2])(trained_teacher)    # or build one yourself
    """

    def __init__(self, layers: Union[int, Sequence[int]] = 2) -> None:
        if isinstance(layers, bool) or not (isinstance(layers, int) or _int_sequence(layers)):
            raise ValueError(f"layers must be a count >= 1 or a list of layer indices, got {layers!r}")
        if isinstance(layers, int) and layers < 1:
            raise ValueError(f"layers must be a count >= 1 or a list of layer indices, got {layers!r}")
        if not isinstance(layers, int) and (not layers or min(layers) < 0 or len(set(layers)) != len(layers)):
            raise ValueError(f"layers must list distinct indices >= 0, got {list(layers)!r}")
        self.layers = layers if isinstance(layers, int) else list(layers)

    def __repr__(self) -> str:
        return f"TruncatedStudent(layers={self.layers!r})"

    def indices(self, depth: int) -> list[int]:
        """The layers kept out of ``depth``: evenly spaced over the stack for a count."""
        if not isinstance(self.layers, int):
            if max(self.layers) >= depth:
                raise NoLayerStackError(f"TruncatedStudent: layers {self.layers} are out of range for a stack of "
                                        f"{depth} layers")
            return sorted(self.layers)
        if self.layers >= depth:
            raise NoLayerStackError(f"TruncatedStudent(layers={self.layers}) keeps every layer of a {depth}-layer "
                                    "stack: the student would be the teacher; give fewer layers")
        keep = self.layers
        if keep == 1:
            return [0]
        return sorted({round(i * (depth - 1) / (keep - 1)) for i in range(keep)})

    def __call__(self, teacher: nn.Module) -> nn.Module:
        """A CPU copy of ``teacher`` with its layer stack cut; ``teacher`` itself is not changed."""
        student = merge_adapters(cpu_copy(teacher))
        found = layer_stack(student)
        if found is None:
            raise NoLayerStackError(
                f"TruncatedStudent: {type(teacher).__name__} has no stack of repeated layers (an nn.ModuleList of "
                "one layer type) to truncate: pass Distill(student=your_model) instead")
        owner, name, stack = found
        keep = self.indices(len(stack))
        setattr(owner, name, nn.ModuleList([stack[i] for i in keep]))
        for module in student.modules():
            config = getattr(module, "config", None)
            if config is not None and isinstance(getattr(config, "num_hidden_layers", None), int):
                config.num_hidden_layers = len(keep)
        for param in student.parameters():
            param.requires_grad_(True)
        return student.train()


def merge_adapters(model: nn.Module) -> nn.Module:
    """``model`` with every peft adapter (LoRA...) merged into its base weights (in place where nested)."""
    merge = getattr(model, "merge_and_unload", None)
    if callable(merge):
        return merge()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            merge = getattr(child, "merge_and_unload", None)
            if callable(merge):
                setattr(parent, name, merge())
    return model


def served_copy(model: nn.Module) -> nn.Module:
    """The model as it would be served: a CPU copy with its adapters merged, or ``model`` itself
    when it has none (unmerged LoRA layers cost a third more CPU time on MiniLM, for nothing)."""
    if not any(callable(getattr(m, "merge_and_unload", None)) for m in model.modules()):
        return model
    return merge_adapters(cpu_copy(model)).eval()


def layer_stack(model: nn.Module) -> Optional[tuple[nn.Module, str, nn.ModuleList]]:
    """``(owner, attribute, stack)``: the longest ``nn.ModuleList`` (>= 2 entries) of one layer type."""
    best = None
    for owner in model.modules():
        for name, child in owner.named_children():
            if not isinstance(child, nn.ModuleList) or len(child) < 2 or len({type(m) for m in child}) != 1:
                continue
            if best is None or len(child) > len(best[2]):
                best = (owner, name, child)
    return best


def _int_sequence(value: object) -> bool:
    return (isinstance(value, (list, tuple)) and
            all(isinstance(i, int) and not isinstance(i, bool) for i in value))
