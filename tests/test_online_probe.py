"""OnlineProbe: a k-NN / linear probe accuracy for self-supervised runs, logged like any metric."""

from importlib import import_module
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import preset_for
from costaware.callbacks.online_probe import OnlineProbe, knn_predict, ridge_predict
from costaware.ledger import read_ledger

PRESET = Path(__file__).resolve().parents[1] / "callbacks" / "online_probe.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clusters(n=200, dim=32, classes=4, seed=0, spread=0.3):
    """``classes`` well separated Gaussian clusters in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(n) % classes
    return centers[y] + spread * torch.randn(n, dim, generator=g), y


def identity(pl_module, inputs):
    return inputs


def trainer_for(ns, tmp_path, callbacks, **kwargs):
    args = dict(max_epochs=2, limit_train_batches=2, limit_val_batches=1, default_root_dir=tmp_path,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)
    return ns.Trainer(callbacks=callbacks, **{**args, **kwargs})


@pytest.mark.parametrize("probe", ["knn", "linear"])
def test_known_embedding_separable_and_random_labels(probe):
    x, y = clusters(n=400)
    separable = OnlineProbe(train=(x[:200], y[:200]), val=(x[200:], y[200:]), probe=probe, embed_fn=identity)
    assert separable.score(nn.Identity()) == 1.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    chance = OnlineProbe(train=(x[:200], shuffled[:200]), val=(x[200:], shuffled[200:]), probe=probe,
                         embed_fn=identity)
    assert abs(chance.score(nn.Identity()) - 0.25) < 0.12


def test_logged_and_usable_as_early_stopping_monitor(ns, tmp_path):
    x, y = clusters()
    probe = ns.costaware.OnlineProbe(train=(x[:100], y[:100]), val=(x[100:], y[100:]), embed_fn=identity)
    early = ns.callbacks.EarlyStopping(monitor="probe/acc", mode="max", patience=1, strict=True)
    trainer = trainer_for(ns, tmp_path, [probe, early], max_epochs=10)
    trainer.fit(ns.BoringModel())
    assert float(trainer.callback_metrics["probe/acc"]) == 1.0
    # The accuracy cannot improve on 1.0: EarlyStopping stops after patience + 1 validations.
    assert trainer.current_epoch == 2 and early.stopped_epoch == 1
    assert probe.validations == 2 and len(probe.history) == 2
    assert probe.total_seconds > 0
    assert float(trainer.callback_metrics["probe/seconds"]) == pytest.approx(probe.total_seconds, rel=1e-5)
    assert "probe/cost_usd" not in trainer.callback_metrics  # no CostMonitor, no dollars


def test_cost_recorded_with_cost_monitor(ns, tmp_path):
    x, y = clusters()
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=3600.0, cpu_tdp_w=10, ram_power_w=1)  # $1 a second
    probe = ns.costaware.OnlineProbe(train=(x[:100], y[:100]), val=(x[100:], y[100:]), k=5, probe="linear")
    trainer = trainer_for(ns, tmp_path, [monitor, probe])
    trainer.fit(ns.BoringModel())  # default embedding: BoringModel's forward, a Linear(32, 2)
    assert 0.0 <= probe.last_acc <= 1.0
    events = [e for e in read_ledger(monitor.ledger.path).events if e["name"] == "online_probe"]
    assert len(events) == 2
    assert all(e.duration_s > 0 and e["cost_usd"] > 0 and e["metric"] == "probe/acc" for e in events)
    assert events[-1]["acc"] == pytest.approx(probe.last_acc)
    assert float(trainer.callback_metrics["probe/cost_usd"]) == pytest.approx(sum(e["cost_usd"] for e in events),
                                                                              rel=1e-5)
    assert probe.total_usd < monitor.totals.usd  # a part of the run
    metrics = [m for m in read_ledger(monitor.ledger.path).metrics if m["name"] == "probe/acc"]
    assert len(metrics) == 2  # the monitor records it against dollars, as any monitored metric


def test_reads_the_meter_of_a_budget_cap_listed_after_it(pl_ns, tmp_path):
    x, y = clusters()
    probe = pl_ns.costaware.OnlineProbe(train=(x[:100], y[:100]), val=(x[100:], y[100:]), k=5)
    cap = pl_ns.costaware.BudgetCap(max_usd=1e6, usd_per_host_hour=3600.0)  # meters the run itself
    trainer = trainer_for(pl_ns, tmp_path, [probe, cap])
    trainer.fit(pl_ns.BoringModel())
    assert probe.meter is cap.meter is cap.own_meter and probe.total_usd > 0
    assert "probe/cost_usd" in trainer.callback_metrics


def test_every_n_steps_and_restores_train_mode(ns, tmp_path):
    x, y = clusters()
    seen_modes = []

    def embed(pl_module, inputs):
        seen_modes.append(pl_module.training)
        return pl_module(inputs)

    probe = ns.costaware.OnlineProbe(train=(x[:100], y[:100]), val=(x[100:], y[100:]), every_n_val=None,
                                     every_n_steps=2, embed_fn=embed, log_name="ssl/knn_acc")
    model = ns.BoringModel()

    class Check(ns.pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert pl_module.training and torch.is_grad_enabled()

    trainer = trainer_for(ns, tmp_path, [probe, Check()], max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(model)
    assert [h["step"] for h in probe.history] == [2, 4] and all(h["on_step"] for h in probe.history)
    assert seen_modes and not any(seen_modes)
    assert "ssl/knn_acc" in trainer.callback_metrics and "ssl/seconds" in trainer.callback_metrics
    assert model.training


def test_embed_method_is_the_default(ns):
    x, y = clusters(n=80)

    class WithEmbed(ns.BoringModel):
        def embed(self, inputs):
            return inputs  # identity: the probe is perfect

    probe = OnlineProbe(train=(x[:40], y[:40]), val=(x[40:], y[40:]))
    assert probe.score(WithEmbed()) == 1.0


def test_dataloader_and_file_inputs_and_label_values(tmp_path):
    x, y = clusters(n=120, classes=2)
    labels = torch.where(y == 0, torch.tensor(-1), torch.tensor(7))  # any integers
    loader = DataLoader(TensorDataset(x[:60], labels[:60]), batch_size=16)
    torch.save({"inputs": x[60:], "labels": labels[60:]}, tmp_path / "val.pt")
    probe = OnlineProbe(train=loader, val=str(tmp_path / "val.pt"), embed_fn=identity)
    assert probe.classes.tolist() == [-1, 7] and len(probe.train_labels) == 60
    assert probe.score(nn.Identity()) == 1.0


def test_state_dict_round_trip_and_state_key(ns):
    x, y = clusters(n=40)
    a = ns.costaware.OnlineProbe(train=(x, y), val=(x, y), log_name="probe/knn_acc")
    b = ns.costaware.OnlineProbe(train=(x, y), val=(x, y), log_name="probe/linear_acc", probe="linear")
    assert a.state_key != b.state_key
    a.validations, a.total_seconds, a.total_usd, a.last_acc = 3, 1.5, 0.01, 0.9
    b.load_state_dict(a.state_dict())
    assert (b.validations, b.total_seconds, b.total_usd, b.last_acc) == (3, 1.5, 0.01, 0.9)


def test_probes_directly():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict(train, labels, query, k=3).tolist() == [0, 1]
    assert knn_predict(train, labels, query, k=100, temperature=None).tolist() == [0, 0]  # all vote: a tie
    assert ridge_predict(train, labels, query).tolist() == [0, 1]
    wide = torch.randn(4, 50)  # more features than examples: the dual solve
    assert ridge_predict(wide, labels, wide, ridge=1e-6).tolist() == labels.tolist()


@pytest.mark.parametrize("kwargs, match", [
    ({"probe": "svm"}, "probe must be one of"),
    ({"k": 0}, "k must be an int >= 1"),
    ({"every_n_val": 0}, "every_n_val must be an int >= 1 or None"),
    ({"every_n_val": None}, "give at least one"),
    ({"knn_temperature": 0}, "knn_temperature must be > 0"),
    ({"ridge": -1.0}, "ridge must be >= 0"),
    ({"log_name": ""}, "log_name must be a metric name"),
    ({"embed_fn": "embed"}, "embed_fn must be a callable"),
    ({"train": (torch.zeros(3, 2), torch.zeros(2))}, "train must hold as many labels as inputs"),
    ({"val": (torch.zeros(2, 2), torch.tensor([0.5, 1.0]))}, "val's labels must be class indices"),
    ({"train": 5}, "train must be"),
    ({"train": "/no/such/file.pt"}, "is not a file"),
])
def test_bad_arguments(kwargs, match):
    data = (torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=match):
        OnlineProbe(**{"train": data, "val": data, **kwargs})


def test_preset_config(ns, tmp_path):
    x, y = clusters()
    torch.save((x[:100], y[:100]), tmp_path / "probe_train.pt")
    torch.save((x[100:], y[100:]), tmp_path / "probe_val.pt")
    text = PRESET.read_text().replace("data/probe_train.pt", str(tmp_path / "probe_train.pt"))
    text = text.replace("data/probe_val.pt", str(tmp_path / "probe_val.pt"))
    preset = preset_for(ns, text, tmp_path)
    cli = import_module(f"{ns.name}.cli").LightningCLI(
        ns.BoringModel, args=["fit", f"--config={preset}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                              "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
                              "--trainer.enable_progress_bar=false"],
        save_config_kwargs={"overwrite": True})
    assert "probe/acc" in cli.trainer.callback_metrics


def test_counts_restored_for_a_resumed_fit_only():
    """Lightning restores callback state for ``trainer.validate(ckpt_path=...)`` too: a fit after it is new."""
    x, y = clusters()
    probe = OnlineProbe(train=(x[:100], y[:100]), val=(x[100:], y[100:]), embed_fn=identity)
    saved = {"validations": 5, "total_seconds": 2.0, "total_usd": 0.5, "last_acc": 0.9}
    probe.setup(None, None, stage="validate")
    probe.load_state_dict(saved)
    assert (probe.validations, probe.total_usd, probe.last_acc) == (0, 0.0, None)
    probe.setup(None, None, stage="fit")
    probe.load_state_dict(saved)
    assert (probe.validations, probe.total_usd, probe.last_acc) == (5, 0.5, 0.9)
