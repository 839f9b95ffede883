"""FLOPs counted on real batches (LoRA's frozen weights included) and the peak table behind MFU."""

import pytest
import torch
from torch import nn

from costaware.gpus import gpu_model
from costaware.meters.flops import PEAK_FLOPS_PER_S, FlopsCounter, compute_format, peak_flops_per_s


class FrozenBaseWithAdapter(nn.Module):
    """A frozen linear layer plus a trainable low-rank adapter, as LoRA builds it."""

    def __init__(self, d=64, r=4):
        super().__init__()
        self.base = nn.Linear(d, d, bias=False).requires_grad_(False)
        self.down = nn.Linear(d, r, bias=False)
        self.up = nn.Linear(r, d, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _train_step(model, x):
    model(x).sum().backward()


def test_frozen_weights_get_no_weight_gradient_flops():
    batch, d, r = 8, 64, 4
    model = FrozenBaseWithAdapter(d, r)
    x = torch.randn(batch, d, requires_grad=False)
    counter = FlopsCounter(measure_batches=1, skip_batches=0)
    counter.batch_start(model, 0)
    _train_step(model, x)
    counter.batch_end(model)
    mm = lambda m, k, n: 2 * m * k * n  # noqa: E731
    forward = mm(batch, d, d) + mm(batch, d, r) + mm(batch, r, d)
    # Backward: the frozen base needs no weight grad, and no input grad either (x needs none),
    # the adapter needs both weight grads and the grad flowing between its two halves.
    backward = mm(r, batch, d) + mm(d, batch, r) + mm(batch, d, r)
    assert counter.total_flops == forward + backward


def test_later_batches_reuse_the_mean_and_declared_flops_win():
    model = FrozenBaseWithAdapter()
    counter = FlopsCounter(measure_batches=2, skip_batches=1)
    for i in range(6):
        counter.batch_start(model, i)
        _train_step(model, torch.randn(8, 64))
        counter.batch_end(model)
    assert counter.total_flops == pytest.approx(6 * counter.flops_per_batch)

    model.flops_per_batch = 1e9
    declared = FlopsCounter()
    for i in range(3):
        declared.batch_start(model, i)
        declared.batch_end(model)
    assert declared.total_flops == 3e9 and declared.source == "the module's flops_per_batch"


@pytest.mark.parametrize(
    ("name", "model"),
    [("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200-NVL"), ("NVIDIA L40", "L40"), ("NVIDIA L40S", "L40S"),
     ("NVIDIA L4", "L4"), ("NVIDIA H100 NVL", "H100-NVL"), ("NVIDIA H100 PCIe", "H100-PCIE"),
     ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A10G", "A10G"),
     ("Tesla T4", "T4"), ("NVIDIA GeForce RTX 4090", None)],
)
def test_gpu_names_resolve(name, model):
    assert gpu_model(name) == model


def test_peak_table_is_dense_and_complete():
    for model in ("H100-SXM", "H100-PCIE", "H100-NVL", "H200", "A100", "L4", "L40", "L40S", "A10G", "T4"):
        assert model in PEAK_FLOPS_PER_S
    # Dense bf16: half the data sheets' "with sparsity" figures.
    assert PEAK_FLOPS_PER_S["H100-SXM"]["bf16"] == pytest.approx(989.4e12)
    assert PEAK_FLOPS_PER_S["A100"]["bf16"] == pytest.approx(312e12)
    assert PEAK_FLOPS_PER_S["L40"]["bf16"] != PEAK_FLOPS_PER_S["L4"]["bf16"]
    assert peak_flops_per_s("NVIDIA H200", "bf16-mixed") == pytest.approx(989.4e12)
    assert peak_flops_per_s("Tesla T4", "bf16-mixed") is None  # T4 has no bf16: no MFU, not a wrong one
    assert peak_flops_per_s(None) is None


def test_compute_format_follows_lightning_precision():
    assert compute_format("bf16-mixed") == "bf16"
    assert compute_format("16-mixed") == "fp16"
    assert compute_format("32-true") == "fp32"
    assert compute_format("32-true", "high") == "tf32"
    assert compute_format("transformer-engine") == "fp8"


def test_a_batch_skipped_by_the_module_does_not_leave_counting_on(pl_ns, tmp_path):
    """on_train_batch_start returning -1 ends the epoch before on_train_batch_end."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    class Skips(pl_ns.BoringModel):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 1 else None

    monitor = pl_ns.costaware.CostMonitor(usd_per_host_hour=1.0, cpu_tdp_w=10, ram_power_w=1)
    trainer = pl_ns.Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=1, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, callbacks=[monitor])
    trainer.fit(Skips())
    assert not _get_current_dispatch_mode_stack()
    assert monitor.totals.train_batches == 2 and monitor.totals.flops > 0
