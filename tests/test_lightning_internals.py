"""The Lightning internals adapter, against the installed release (scripts/test_versions runs
it against the oldest and the newest supported ones too)."""

import pytest

from costaware import _lightning_internals as internals


def _probe(ns):
    class Probe(ns.pl.Callback):
        def __init__(self):
            self.logs, self.steps, self.met = [], [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.logs.append(internals.should_log(trainer))
            self.steps.append((internals.logging_step(trainer), trainer.global_step))
            self.met.append(internals.minimums_met(trainer))

    return Probe()


def test_logging_batches_and_step(ns, tmp_path):
    probe = _probe(ns)
    trainer = ns.Trainer(max_steps=10, log_every_n_steps=2, limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[probe])
    trainer.fit(ns.BoringModel())
    assert all(isinstance(x, bool) for x in probe.logs) and sum(probe.logs) == 5  # every second batch
    # The step Lightning logs a batch's metrics at: the optimizer steps before this one.
    assert [step for step, _ in probe.steps] == [global_step - 1 for _, global_step in probe.steps]


@pytest.mark.parametrize("log_every, accumulate, stop_at", [(2, 1, None), (3, 2, None), (0, 1, None), (5, 1, 3)])
def test_should_log_agrees_with_lightnings_own_property(ns, tmp_path, log_every, accumulate, stop_at):
    """``should_log`` computes the fit loop's branch of ``should_update_logs`` itself (cheaper):
    the two must agree on every batch, under gradient accumulation and once a stop is asked."""
    seen = []

    class Probe(ns.pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == stop_at:
                trainer.should_stop = True
            seen.append((internals.should_log(trainer), trainer._logger_connector.should_update_logs))

    trainer = ns.Trainer(max_steps=12, log_every_n_steps=log_every, accumulate_grad_batches=accumulate,
                         limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[Probe()], logger=log_every > 0)
    trainer.fit(ns.BoringModel())
    assert seen and all(ours == theirs for ours, theirs in seen)
    assert any(ours for ours, _ in seen) == (log_every > 0)


def test_minimums_read_written_and_met(ns, tmp_path):
    probe = _probe(ns)
    trainer = ns.Trainer(max_epochs=4, min_epochs=2, limit_train_batches=2, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[probe])
    assert internals.read_minimums(trainer) == (2, None)
    trainer.fit(ns.BoringModel())
    assert probe.met == [False] * 4 + [True] * 4  # met once two epochs are done
    internals.write_minimums(trainer, (None, None))
    assert internals.read_minimums(trainer) == (None, None) and internals.minimums_met(trainer)
    internals.write_minimums(trainer, (2, 7))
    assert internals.read_minimums(trainer) == (2, 7)


def test_checkpoint_intervals_and_time_based_validation(ns, tmp_path):
    by_steps = ns.callbacks.ModelCheckpoint(every_n_train_steps=3)
    default = ns.callbacks.ModelCheckpoint()
    by_epochs = ns.callbacks.ModelCheckpoint(every_n_epochs=2)
    assert (internals.checkpoint_every_n_train_steps(by_steps), internals.checkpoint_every_n_epochs(by_steps)) == (3, 0)
    assert (internals.checkpoint_every_n_train_steps(default), internals.checkpoint_every_n_epochs(default)) == (0, 1)
    assert internals.checkpoint_every_n_epochs(by_epochs) == 2
    trainer = ns.Trainer(max_steps=1, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, logger=False, enable_checkpointing=False)
    trainer.fit(ns.BoringModel())
    assert internals.validation_is_time_based(trainer) is False


@pytest.mark.parametrize("name", ["should_log", "logging_step", "minimums_met", "read_minimums"])
def test_each_adapter_reads_what_lightning_has(ns, name):
    """Each internal the adapter reads exists on a fresh Trainer (a release that moved one fails here)."""
    trainer = ns.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    getattr(internals, name)(trainer)


def test_published_metrics_are_monitorable_logged_and_in_the_progress_bar(ns, tmp_path):
    """What costaware publishes without pl_module.log is what EarlyStopping, ModelCheckpoint and the bar read."""
    class Publish(ns.pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            internals.publish_metrics(trainer, {"cost/usd": 0.5 - batch_idx / 100, "cost/kwh": 2.0},
                                      prog_bar=("cost/usd",))

    stop = ns.callbacks.EarlyStopping(monitor="cost/usd", mode="max", patience=0, check_on_train_epoch_end=True)
    best = ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="cost/usd", mode="max")
    trainer = ns.Trainer(max_epochs=5, limit_train_batches=2, limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Publish(), stop, best])
    trainer.fit(ns.BoringModel())
    assert float(trainer.callback_metrics["cost/kwh"]) == 2.0 and float(trainer.logged_metrics["cost/kwh"]) == 2.0
    assert trainer.progress_bar_metrics["cost/usd"] == pytest.approx(0.49)
    assert best.best_model_score is not None and float(best.best_model_score) == pytest.approx(0.49)
    assert stop.stopped_epoch == 1  # cost/usd did not improve at the second epoch end: stopped
