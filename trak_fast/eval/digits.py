"""The embedded demo data set: scikit-learn's handwritten digits, small models, a recipe.

1,797 real 8x8 grey images in 10 classes ship inside scikit-learn (no download). Used by
``make demo``, the LDS harness, the benchmarks and the tests. scikit-learn is imported
only when data is loaded, so the rest of trak_fast never needs it.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

Batch = Tuple[torch.Tensor, torch.Tensor]


def load_digits(n_train: int = 1000, n_targets: int = 100, *, split_seed: int = 0):
    """A fixed, shuffled split of the digits set into train and target examples.

    Returns ``(x_train [n_train, 64], y_train, x_target [n_targets, 64], y_target)``:
    float32 pixels scaled to [0, 1] and int64 labels, on the CPU.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from exc
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    if n_train < 1 or n_targets < 1 or n_train + n_targets > len(x):
        raise ValueError(
            f"n_train + n_targets must be at most {len(x)} with both >= 1, got {n_train} + {n_targets}"
        )
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    train, target = order[:n_train], order[n_train:n_train + n_targets]
    return x[train], y[train], x[target], y[target]


def make_mlp(hidden: int = 128, *, seed: int = 0, in_features: int = 64, classes: int = 10) -> nn.Module:
    """MLP in_features-hidden-classes with a ReLU, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class SmallCNN(nn.Module):
    """A small CNN for 8x8 digits (input ``[B, 64]``, reshaped to one channel); ~0.28M parameters."""

    def __init__(self, width: int = 96, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)))


def make_cnn(width: int = 96, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(width)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 30, lr: float = 1e-2,
          batch_size: int = 64, weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    """Trains ``model`` in place with SGD + momentum and cross-entropy; deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()
    return model


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 100) -> List[Batch]:
    """``(inputs, labels)`` batches in a fixed order, as a non-shuffling DataLoader gives."""
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()
