"""Quantize: int8 and NF4 post-training quantization (bitsandbytes, torch dynamic int8) on CPU, kept only
within max_drop and when it lowers the objective."""

import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from costaware.deploy import Deployment
from costaware.ledger import read_ledger
from costaware.strategies.base import ModelRow, StopContext
from costaware.strategies.quantize import (
    LightningMetric,
    QuantizationUnavailableError,
    Quantize,
    _Variant,
    load_quantized,
    quantize_linear_layers,
    torch_dynamic_int8,
)

bnb = pytest.importorskip("bitsandbytes")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def separable(n=384, dim=8, margin=0.5, seed=0):
    """Two classes split by a hyperplane with a margin: a small MLP gets them all right."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, dim, generator=g)
    score = x[:, 0] + x[:, 1]
    keep = score.abs() > margin
    x, score = x[keep][:n], score[keep][:n]
    return x, (score > 0).long()


def make_classifier(ns):
    class Classifier(ns.pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean())
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.02)

    return Classifier()


def fit(ns, tmp_path, steps=24):
    torch.manual_seed(0)
    x, y = separable()
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[256:], y[256:]), batch_size=64)
    model = make_classifier(ns)
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=3.6, cpu_tdp_w=10, ram_power_w=1)
    trainer = ns.Trainer(max_steps=steps, default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[monitor], num_sanity_val_steps=0,
                         check_val_every_n_epoch=3, log_every_n_steps=4)
    trainer.fit(model, train, val)
    return trainer, model, monitor


@pytest.mark.parametrize("bits", [8])
def test_after_fit_keeps_quantized_model(ns, tmp_path, bits):
    trainer, model, monitor = fit(ns, tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    strategy = Quantize(bits=bits, max_drop=0.02, backend="bitsandbytes", objective="memory")
    rows = strategy.after_fit(StopContext(trainer=trainer, pl_module=model, monitor=monitor, metric_name="val_acc"))

    teacher, quantized = rows
    assert isinstance(teacher, ModelRow) and (teacher.role, quantized.role) == ("teacher", "quantized")
    assert teacher.metric >= 0.95  # the toy task is learned
    assert teacher.metric - quantized.metric <= 0.02
    assert strategy.kept and quantized.note.startswith("kept")
    assert quantized.size_bytes < teacher.size_bytes
    assert teacher.params == quantized.params == sum(p.numel() for p in model.parameters())
    assert teacher.latency_ms_per_example > 0 and quantized.latency_ms_per_example > 0
    assert teacher.train_usd == quantized.train_usd == pytest.approx(monitor.totals.usd) and teacher.train_usd > 0
    path = tmp_path / "lightning_logs" / "version_0" / "costaware" / "quantized.pt"
    assert quantized.path == str(path) and path.stat().st_size == quantized.size_bytes
    # The trained model is untouched, and the kept one really is quantized.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in strategy.model.net if not isinstance(m, nn.ReLU))
    event = [e for e in read_ledger(path.parent).events if e["name"] == "quantize"][-1]
    assert event["kept"] is True and event["bits"] == bits and event["quantized_metric"] == quantized.metric
    assert event["objective"] == "memory" and event["quantized_size_bytes"] < event["float_size_bytes"]
    assert event["backend"] == f"bitsandbytes_{'int8' if bits == 8 else 'nf4'}"


def test_nf4_keeps_a_smaller_model():
    """4 bits (bitsandbytes' CPU kernels want layers of whole 64-weight blocks and 32-row tiles)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    loader = DataLoader(TensorDataset(torch.randn(32, 64)), batch_size=16)
    strategy = Quantize(bits=4, max_drop=1.0, objective="memory", latency_batches=1, latency_repeats=1)
    kept, rows = strategy.apply(model, loader, lambda m, dl: 1.0)
    assert strategy.kept and strategy.kept_backend == "bitsandbytes_nf4"
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in (kept[0], kept[2]))
    assert rows[1].size_bytes < rows[0].size_bytes / 3


def test_a_failing_backend_is_a_rejected_variant_not_a_crash():
    """bitsandbytes' CPU 4-bit kernels fail on a 2-output layer: the variant says so."""
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    loader = DataLoader(TensorDataset(torch.randn(32, 8)), batch_size=16)
    strategy = Quantize(bits=4, max_drop=1.0, objective="memory", latency_batches=1, latency_repeats=1)
    with pytest.warns(RuntimeWarning, match="bitsandbytes_nf4 failed"):
        kept, rows = strategy.apply(model, loader, lambda m, dl: m.eval()(torch.randn(4, 8)).sum().item() * 0 + 1)
    assert kept is model and not strategy.kept and "failed" in rows[1].note


def test_auto_tries_both_int8_backends_and_keeps_the_smaller(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 2))
    loader = DataLoader(TensorDataset(torch.randn(64, 8)), batch_size=16)
    strategy = Quantize(bits=8, max_drop=1.0, objective="memory", latency_batches=1, latency_repeats=1)
    kept, rows = strategy.apply(model, loader, lambda m, dl: 1.0, save_path=tmp_path / "q.pt")
    assert [v.backend for v in strategy.variants] == ["bitsandbytes_int8", "torch_int8"]
    assert all(v.acceptable for v in strategy.variants)
    smaller = min(strategy.variants, key=lambda v: v.size_bytes)
    assert strategy.kept and strategy.kept_backend == smaller.backend and kept is smaller.model
    assert rows[1].note.startswith(f"kept {smaller.backend}: metric unchanged") and "torch_int8:" in rows[1].note
    assert rows[1].size_bytes == (tmp_path / "q.pt").stat().st_size < rows[0].size_bytes


def test_torch_dynamic_int8_keeps_the_outputs_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(32, 16)
    with torch.no_grad():
        expected = model(x)
    assert torch_dynamic_int8(model, skip_modules=["2"]) == ["0"]
    assert type(model[2]) is nn.Linear and type(model[0]) is not nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=0.05, rtol=0.05)


def _float_row(latency_ms=1.0, size_bytes=1000, metric=0.9):
    return ModelRow(role="student", metric=metric, size_bytes=size_bytes, latency_ms_per_example=latency_ms)


def _variant(metric=0.9, latency_ms=None, size_bytes=None):
    variant = _Variant("torch_int8", nn.Linear(2, 2), ["0"])
    variant.metric, variant.latency_ms, variant.size_bytes = metric, latency_ms, size_bytes
    return variant


@pytest.mark.parametrize(("objective", "figures", "acceptable", "says"), [
    ("latency", {"latency_ms": 0.5}, True, "latency 1 -> 0.5 ms/example (-50.0%)"),
    ("latency", {"latency_ms": 1.2}, False, "latency 1 -> 1.2 ms/example (+20.0%), not 5% lower"),
    ("latency", {"latency_ms": 0.97}, False, "not 5% lower"),  # within noise: not kept
    ("memory", {"size_bytes": 400}, True, "memory 1000 -> 400 bytes"),
    ("usd", {"latency_ms": 0.5}, True, "usd 0.001 -> 0.0005 $/1k requests"),
    ("latency", {"latency_ms": 0.5, "metric": 0.85}, False, "metric drops by 0.05 > max_drop 0.01"),
    ("latency", {"latency_ms": None}, False, "its latency could not be measured"),
])
def test_a_copy_is_kept_only_if_it_lowers_the_objective(objective, figures, acceptable, says):
    """The decision rule on given figures (no timing in a unit test)."""
    variant = _variant(**figures)
    deployment = Deployment(requests=1000, usd_per_hour=3.6)  # 1 ms per example = $0.001 per 1k requests
    variant.judge(_float_row(), "max", 0.01, objective, 0.05, deployment)
    assert variant.acceptable is acceptable and says in variant.reason


def test_dict_batches_lose_their_labels_as_in_distill():
    """Quantize calls the model by the batch protocol: ``model(**inputs)`` without ``labels``."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):  # no labels argument
            return self.fc(x)

    batches = [{"x": torch.randn(4, 8), "labels": torch.zeros(4, dtype=torch.long)} for _ in range(2)]
    strategy = Quantize(bits=8, max_drop=1.0, backend="torch", latency_batches=1, latency_repeats=1)
    _, rows = strategy.apply(Net(), batches, lambda m, dl: 1.0)
    assert rows[0].latency_ms_per_example > 0 and rows[1].latency_ms_per_example > 0


def test_usd_objective_needs_a_deployment():
    with pytest.raises(ValueError, match="objective='usd' needs a deployment"):
        Quantize(objective="usd").apply(nn.Linear(2, 2), None, lambda m, dl: 1.0)


def test_usd_objective_without_a_deployment_fails_before_the_fit(ns, tmp_path):
    """As a policy's strategy, Quantize(objective="usd") has no later chance to get a deployment:
    the fit is refused at setup, before a batch is trained."""
    trained = []

    class Model(ns.BoringModel):
        def training_step(self, batch, batch_idx):
            trained.append(batch_idx)
            return super().training_step(batch, batch_idx)

    policy = ns.costaware.MarginalGainStopping(monitor="val_loss", mode="min", usd_per_point=1.0,
                                               then=Quantize(objective="usd"))
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=1.0)
    trainer = ns.Trainer(max_steps=5, callbacks=[monitor, policy], default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"objective='usd'.* needs a deployment"):
        trainer.fit(Model())
    assert trained == []


def test_usd_objective_after_distill_is_checked_before_the_fit(ns, tmp_path):
    """Quantize(objective="usd") in Distill's ``then`` runs after two trainings: a missing deployment is refused
    at setup, and Distill's own deployment counts as one."""
    from costaware.strategies.distill import Distill

    without = Distill(then=Quantize(objective="usd"))
    policy = ns.costaware.MarginalGainStopping(monitor="val_loss", mode="min", usd_per_point=1.0, then=without)
    trainer = ns.Trainer(max_steps=5, callbacks=[ns.costaware.CostMonitor(usd_per_host_hour=1.0), policy],
                         default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.raises(ValueError, match=r"objective='usd'.* needs a deployment"):
        trainer.fit(ns.BoringModel())
    assert trainer.global_step == 0
    Distill(then=Quantize(objective="usd"), deployment=Deployment(requests=1000, usd_per_hour=0.1)).check_before_fit()


def test_too_strict_max_drop_keeps_float_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    x, _ = separable(n=128)
    loader = DataLoader(TensorDataset(x), batch_size=64)
    with torch.no_grad():
        reference = model(x)

    def agreement(m, dl):  # 0 for the float model, below 0 for anything that changes the outputs
        with torch.no_grad():
            return -F.mse_loss(torch.cat([m(b[0]) for b in dl]), reference).item()

    strategy = Quantize(bits=4, max_drop=0.0, objective="memory")
    kept, rows = strategy.apply(model, loader, agreement, save_path=tmp_path / "q.pt", metric_name="agreement")
    assert kept is model and strategy.kept is False and strategy.model is model
    assert rows[1].note.startswith("rejected: metric drops by") and "max_drop 0" in rows[1].note
    assert rows[1].metric < rows[0].metric == 0.0
    assert not (tmp_path / "q.pt").exists() and rows[1].path is None
    assert rows[1].size_bytes < rows[0].size_bytes  # measured even when rejected


def test_mode_min_counts_a_rise_as_worse():
    model = nn.Sequential(nn.Linear(8, 2))
    loader = DataLoader(TensorDataset(torch.randn(32, 8)), batch_size=16)
    calls = iter([1.0, 1.5])  # float loss 1.0, quantized 1.5
    strategy = Quantize(bits=8, max_drop=0.4, backend="bitsandbytes")
    _, rows = strategy.apply(model, loader, lambda m, dl: next(calls), mode="min", role="student")
    assert rows[0].role == "student" and not strategy.kept and "rises by 0.5 > max_drop 0.4" in rows[1].note


def test_lightning_metric_runs_validation_step(ns, tmp_path):
    trainer, model, _ = fit(ns, tmp_path, steps=20)
    value = LightningMetric("val_acc")(model, trainer.val_dataloaders)
    assert value == pytest.approx(float(trainer.callback_metrics["val_acc"]))  # the fit's last validation
    assert model.trainer is trainer  # the module is given back to its Trainer
    with pytest.raises(KeyError, match="no 'missing' in validation"):
        LightningMetric("missing")(model, trainer.val_dataloaders)


def test_metric_from_online_probe(ns, tmp_path):
    """SSL: the monitored metric is logged by OnlineProbe, which scores the quantized copy itself."""
    torch.manual_seed(0)
    x, y = separable(n=256)
    probe = ns.costaware.OnlineProbe(train=(x[:128], y[:128]), val=(x[128:], y[128:]), k=5)
    model = ns.BoringModel()
    model.layer = nn.Linear(8, 512)  # BoringModel's forward is self.layer(x): the "encoder" (int8 is smaller)
    trainer = ns.Trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[probe], logger=False)
    strategy = Quantize(bits=8, max_drop=0.05, objective="memory")
    rows = strategy.after_fit(StopContext(trainer=trainer, pl_module=model, metric_name="probe/acc"))
    assert rows[0].metric == pytest.approx(probe.score(model))
    assert rows[0].metric > 0.8 and strategy.kept


def test_after_fit_failure_is_a_row_not_a_crash(tmp_path):
    def broken(model, dataloader):
        raise RuntimeError("boom")

    loader = DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=4)
    trainer = SimpleNamespace(global_rank=0, callbacks=[], val_dataloaders=loader, loggers=[],
                              default_root_dir=str(tmp_path))
    strategy = Quantize(metric_fn=broken)
    with pytest.warns(RuntimeWarning, match="Quantize failed"):
        rows = strategy.after_fit(StopContext(trainer=trainer, pl_module=nn.Linear(8, 2), metric_name="val_acc"))
    assert [r.role for r in rows] == ["quantized"] and rows[0].note == "not quantized: RuntimeError: boom"
    assert strategy.kept is False
    # Other ranks leave the work to rank zero.
    assert Quantize().after_fit(StopContext(trainer=SimpleNamespace(global_rank=1), pl_module=None)) == []


def test_quantize_and_reload_state_dict(tmp_path):
    torch.manual_seed(0)
    for bits in (8, 4):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        x = torch.randn(10, 16)
        replaced = quantize_linear_layers(model, bits=bits)
        assert replaced == ["0", "2"]
        torch.save(model.state_dict(), tmp_path / f"q{bits}.pt")
        with torch.no_grad():
            expected = model(x)
        fresh = load_quantized(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), tmp_path / f"q{bits}.pt",
                               bits=bits)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), expected)


def test_skips_attention_tied_and_named_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 8)
            self.tied = nn.Linear(8, 8)
            self.tied_too = nn.Linear(8, 8)
            self.tied_too.weight = self.tied.weight

    net = Net()
    assert quantize_linear_layers(net, bits=8, skip_modules=["head"]) == ["body"]
    assert type(net.attn.out_proj) is not bnb.nn.Linear8bitLt and type(net.head) is nn.Linear


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 3}, "bits must be one of"),
    ({"bits": True}, "bits must be one of"),
    ({"max_drop": -0.1}, r"max_drop must be >= 0.0 \(in units of the monitored metric\), got -0.1"),
    ({"max_drop": float("nan")}, "max_drop must be a finite number >= 0.0, got nan"),
    ({"max_drop": "0.1"}, "max_drop must be a finite number >= 0.0, got '0.1'"),
    ({"quant_type": "int4"}, "quant_type must be one of"),
    ({"blocksize": 10}, "blocksize must be one of"),
    ({"latency_batches": 0}, "latency_batches must be an int >= 1"),
    ({"metric_fn": "val_acc"}, "metric_fn must be a callable"),
    ({"backend": "onnx"}, "backend must be one of"),
    ({"objective": "speed"}, "objective must be one of"),
    ({"min_gain": 1.0}, "min_gain must be"),
    ({"bits": 4, "backend": "torch"}, "int8 only"),
    ({"deployment": {"requests": 10}}, "deployment must be a costaware.deploy.Deployment"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Quantize(**kwargs)


def test_bad_mode_in_apply():
    with pytest.raises(ValueError, match="mode must be one of"):
        Quantize().apply(nn.Linear(2, 2), None, lambda m, dl: 1.0, mode="up")


def test_missing_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(QuantizationUnavailableError, match=r"pip install costaware\[quant\]") as error:
        Quantize(bits=8, backend="bitsandbytes")
    assert isinstance(error.value, ImportError)
    with pytest.raises(QuantizationUnavailableError):
        Quantize(bits=4)  # 4 bits: bitsandbytes only
    assert Quantize(bits=8).backends == ("torch",)  # auto: torch's own int8 is enough


@pytest.fixture
def rank_zero(monkeypatch):
    from lightning_utilities.core.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)


def test_after_fit_never_raises_on_monitor_or_ledger_errors(tmp_path, rank_zero):
    """Reading the monitor's totals and writing the ledger event fail: a row and a warning, no crash."""

    class BrokenMonitor:
        ledger = None

        @property
        def totals(self):
            raise RuntimeError("totals gone")

    loader = DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=4)
    trainer = SimpleNamespace(global_rank=0, callbacks=[], val_dataloaders=loader, loggers=[],
                              default_root_dir=str(tmp_path))
    strategy = Quantize(bits=8, max_drop=1.0, metric_fn=lambda m, dl: 1.0, latency_batches=1, latency_repeats=1,
                        objective="memory")
    with pytest.warns(RuntimeWarning, match="Quantize failed .*totals gone"):
        rows = strategy.after_fit(StopContext(trainer=trainer, pl_module=nn.Linear(8, 2), monitor=BrokenMonitor(),
                                              metric_name="val_acc"))
    assert rows[0].note == "not quantized: RuntimeError: totals gone"

    class BrokenLedger:
        def record_event(self, *args, **kwargs):
            raise OSError("disk full")

    monitor = SimpleNamespace(totals=None, ledger=BrokenLedger())
    with pytest.warns(RuntimeWarning, match="could not record its ledger event"):
        rows = strategy.after_fit(StopContext(trainer=trainer, pl_module=nn.Sequential(nn.Linear(8, 512)),
                                              monitor=monitor, metric_name="val_acc"))
    assert [r.role for r in rows] == ["teacher", "quantized"] and strategy.kept, rows[1].note


def test_a_skipped_after_fit_clears_an_earlier_apply(tmp_path, rank_zero):
    model = nn.Sequential(nn.Linear(8, 512))
    loader = DataLoader(TensorDataset(torch.randn(16, 8)), batch_size=8)
    strategy = Quantize(bits=8, max_drop=1.0, latency_batches=1, latency_repeats=1, objective="memory")
    strategy.apply(model, loader, lambda m, dl: 1.0, save_path=tmp_path / "q.pt")
    assert strategy.kept and strategy.model is not None and strategy.path == tmp_path / "q.pt"
    trainer = SimpleNamespace(global_rank=0, callbacks=[], val_dataloaders=None, loggers=[],
                              default_root_dir=str(tmp_path))
    rows = strategy.after_fit(StopContext(trainer=trainer, pl_module=model, metric_name="val_acc"))
    assert rows[0].note.startswith("not quantized: no validation data")
    assert strategy.kept is False and strategy.model is None and strategy.path is None


def _bitsandbytes_would_look_up_the_hub() -> bool:
    """The test's precondition: an AVX512-BF16 CPU with transformers' ``kernels`` installed."""
    import importlib.util
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    return (cpuinfo.is_file() and "avx512_bf16" in cpuinfo.read_text()
            and importlib.util.find_spec("kernels") is not None)


@pytest.mark.skipif(not _bitsandbytes_would_look_up_the_hub(),
                    reason="bitsandbytes looks nothing up here (no AVX512-BF16 or no kernels package)")
def test_importing_bitsandbytes_calls_no_network():
    """bitsandbytes >= 0.50 asks the hub for a CPU 4-bit kernel at import (on AVX512-BF16 CPUs, with
    transformers' ``kernels`` installed): costaware's import of it looks nothing up, even after
    transformers and the hub client are imported, as in a LoRA script."""
    import subprocess
    import textwrap

    script = textwrap.dedent("""
        import socket
        import transformers  # noqa: F401  (imports huggingface_hub, as a LoRA script does)
        looked_up = []
        real = socket.getaddrinfo
        socket.getaddrinfo = lambda *a, **k: looked_up.append(a[0]) or real(*a, **k)
        from costaware.strategies.conversion import import_bitsandbytes
        import_bitsandbytes()
        print("LOOKUPS", looked_up)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOOKUPS []" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "kernels-community" not in done.stderr  # bitsandbytes' fallback notice is muted too
