"""Quantize: int8 and NF4 post-training quantization with bitsandbytes on CPU, kept only within max_drop."""

import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from costaware.ledger import read_ledger
from costaware.strategies.base import ModelRow, StopContext
from costaware.strategies.quantize import (
    LightningMetric,
    QuantizationUnavailableError,
    Quantize,
    load_quantized,
    quantize_linear_layers,
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


@pytest.mark.parametrize("bits", [8, 4])
def test_after_fit_keeps_quantized_model(ns, tmp_path, bits):
    trainer, model, monitor = fit(ns, tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    strategy = Quantize(bits=bits, max_drop=0.02)
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
    layer = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert all(isinstance(m, layer) for m in strategy.model.net if not isinstance(m, nn.ReLU))
    event = [e for e in read_ledger(path.parent).events if e["name"] == "quantize"][-1]
    assert event["kept"] is True and event["bits"] == bits and event["quantized_metric"] == quantized.metric


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

    strategy = Quantize(bits=4, max_drop=0.0)
    kept, rows = strategy.apply(model, loader, agreement, save_path=tmp_path / "q.pt", metric_name="agreement")
    assert kept is model and strategy.kept is False and strategy.model is model
    assert rows[1].note.startswith("rejected: agreement drops by") and "max_drop 0" in rows[1].note
    assert rows[1].metric < rows[0].metric == 0.0
    assert not (tmp_path / "q.pt").exists() and rows[1].path is None
    assert rows[1].size_bytes < rows[0].size_bytes  # measured even when rejected


def test_mode_min_counts_a_rise_as_worse():
    model = nn.Sequential(nn.Linear(8, 2))
    loader = DataLoader(TensorDataset(torch.randn(32, 8)), batch_size=16)
    calls = iter([1.0, 1.5])  # float loss 1.0, quantized 1.5
    strategy = Quantize(bits=8, max_drop=0.4)
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
    model.layer = nn.Linear(8, 16)  # BoringModel's forward is self.layer(x): the "encoder"
    trainer = ns.Trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[probe], logger=False)
    strategy = Quantize(bits=8, max_drop=0.05)
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
        Quantize(bits=8)
    assert isinstance(error.value, ImportError)


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
    strategy = Quantize(bits=8, max_drop=1.0, metric_fn=lambda m, dl: 1.0, latency_batches=1, latency_repeats=1)
    with pytest.warns(RuntimeWarning, match="Quantize failed .*totals gone"):
        rows = strategy.after_fit(StopContext(trainer=trainer, pl_module=nn.Linear(8, 2), monitor=BrokenMonitor(),
                                              metric_name="val_acc"))
    assert rows[0].note == "not quantized: RuntimeError: totals gone"

    class BrokenLedger:
        def record_event(self, *args, **kwargs):
            raise OSError("disk full")

    monitor = SimpleNamespace(totals=None, ledger=BrokenLedger())
    with pytest.warns(RuntimeWarning, match="could not record its ledger event"):
        rows = strategy.after_fit(StopContext(trainer=trainer, pl_module=nn.Sequential(nn.Linear(8, 2)),
                                              monitor=monitor, metric_name="val_acc"))
    assert [r.role for r in rows] == ["teacher", "quantized"] and strategy.kept, rows[1].note


def test_a_skipped_after_fit_clears_an_earlier_apply(tmp_path, rank_zero):
    model = nn.Sequential(nn.Linear(8, 2))
    loader = DataLoader(TensorDataset(torch.randn(16, 8)), batch_size=8)
    strategy = Quantize(bits=8, max_drop=1.0, latency_batches=1, latency_repeats=1)
    strategy.apply(model, loader, lambda m, dl: 1.0, save_path=tmp_path / "q.pt")
    assert strategy.kept and strategy.model is not None and strategy.path == tmp_path / "q.pt"
    trainer = SimpleNamespace(global_rank=0, callbacks=[], val_dataloaders=None, loggers=[],
                              default_root_dir=str(tmp_path))
    rows = strategy.after_fit(StopContext(trainer=trainer, pl_module=model, metric_name="val_acc"))
    assert rows[0].note.startswith("not quantized: no validation data")
    assert strategy.kept is False and strategy.model is None and strategy.path is None
