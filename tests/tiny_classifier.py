"""A small MLP classifier of either Lightning namespace and its data, for tests that need a model that learns."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FEATURES = 16


def tiny_data(n: int = 512, seed: int = 0) -> TensorDataset:
    """``(x, y)`` with ``y`` a linear rule of ``x``, drawn from ``seed``: the same rule (and first rows) for every
    ``n`` of one seed, so the 256 validation rows of :func:`tiny_loaders` are the training set's first 256."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(FEATURES, generator=g)  # the rule, the same for every split
    x = torch.randn(n, FEATURES, generator=g)
    return TensorDataset(x, (x @ w > 0).long())


def tiny_loaders():
    """Training (512, shuffled) and validation (256) loaders."""
    return (DataLoader(tiny_data(512, 0), batch_size=32, shuffle=True),
            DataLoader(tiny_data(256, 0), batch_size=64))


def tiny_classifier(ns, clock=None, net=None):
    """A classifier of the namespace around ``net`` (default: a small MLP on ``FEATURES``); ``(x, y)`` batches, logs
    val_acc; each training step advances ``clock`` by a second when one is given. Seeded: ``net`` is built after."""
    torch.manual_seed(0)

    class Classifier(ns.pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net() if net is not None else nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(),
                                                                   nn.Linear(64, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if clock is not None:
                clock.advance(1.0)
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return Classifier()
