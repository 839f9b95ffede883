"""The student's fit: the distillation loss and the LightningModule that trains a student on a frozen teacher."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from costaware.strategies.batches import call_model, count_examples


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                      temperature: float, alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    Logits of shape ``(..., classes)`` are flattened to ``(-1, classes)``; without labels only
    the soft term counts (weight 1). The ``T^2`` keeps the soft term's gradients the size of the
    hard term's whatever the temperature (Hinton et al., 2015).
    """
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes).float()
    t = teacher_logits.reshape(-1, classes).float()
    soft = nn.functional.kl_div(nn.functional.log_softmax(s / temperature, dim=-1),
                                nn.functional.log_softmax(t / temperature, dim=-1),
                                reduction="batchmean", log_target=True) * temperature**2
    if labels is None or alpha >= 1.0:
        return soft
    hard = nn.functional.cross_entropy(s, labels.reshape(-1).long())
    return alpha * soft + (1.0 - alpha) * hard


_MODULE_CLASSES: dict = {}


def distill_module_class(pl: Any) -> type:
    """A LightningModule of namespace ``pl`` that trains the student on the frozen teacher."""
    if pl.__name__ in _MODULE_CLASSES:
        return _MODULE_CLASSES[pl.__name__]

    class DistillModule(pl.LightningModule):
        def __init__(self, student: nn.Module, teacher: nn.Module, split: Callable, temperature: float, alpha: float,
                     lr: float, weight_decay: float, warmup_fraction: Optional[float] = None) -> None:
            super().__init__()
            self.student = student
            object.__setattr__(self, "teacher", teacher)  # not a submodule: not trained, not checkpointed
            self.split = split
            self.temperature, self.alpha, self.lr, self.weight_decay = temperature, alpha, lr, weight_decay
            self.warmup_fraction = warmup_fraction
            self.losses: list = []

        def on_fit_start(self) -> None:
            self.teacher.to(self.device)
            self.teacher.eval()

        def forward(self, inputs: Any) -> torch.Tensor:
            return call_model(self.student, inputs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, labels = self.split(batch)
            with torch.no_grad():
                teacher_logits = call_model(self.teacher, inputs)
            student_logits = call_model(self.student, inputs)
            loss = distillation_loss(student_logits, teacher_logits.detach(), labels, self.temperature, self.alpha)
            self.losses.append(loss.detach())
            self.log("distill_loss", loss, prog_bar=True, batch_size=count_examples(inputs, labels))
            return loss

        def configure_optimizers(self) -> Any:
            params = [p for p in self.student.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            if self.warmup_fraction is None:
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup_then_decay(
                optimizer, int(self.trainer.estimated_stepping_batches), self.warmup_fraction), "interval": "step"}}

    DistillModule.__qualname__ = DistillModule.__name__
    _MODULE_CLASSES[pl.__name__] = DistillModule
    return DistillModule


def warmup_then_decay(optimizer: torch.optim.Optimizer, total_steps: int,
                      warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate rising linearly over the first ``warmup_fraction`` of the steps, then falling linearly to zero."""
    total = max(total_steps, 1)
    warmup = max(int(warmup_fraction * total), 1)

    def scale(step: int) -> float:
        return min((step + 1) / warmup, max(total - step, 0) / max(total - warmup, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
