"""The Distribution Discriminative Auto-Selector (DDAS) of MoE-Adapters (Yu et al., CVPR 2024).

One small autoencoder per task learns to reconstruct that task's image features from a frozen
extractor (here: the frozen image tower's normalised embedding; the paper uses ImageNet AlexNet
features, which do not ship offline). At test time, for *each image*, the task whose autoencoder
reconstructs its features best is the candidate; the image goes to that task's router if the error
is within the task's threshold, and to the frozen zero-shot model otherwise. An optional extra
autoencoder for the pretraining domain (the paper trains it on Tiny-ImageNet) sends the images it
wins straight to zero-shot.

Thresholds are calibrated, not typed in: each task's threshold is the ``quantile`` (default 0.95)
of its own autoencoder's errors on images of that task held out from the autoencoder's training.
So about 5% of a task's own images are expected to fall back to zero-shot, and an image from a
domain no autoencoder has seen goes to zero-shot when it reconstructs worse than that. (The official
code uses one hand-set constant for all tasks and decides once per evaluation batch.)
"""

from __future__ import annotations

import torch
from torch import nn

from clipcl.data.base import DataError

ZERO_SHOT = -1
"""The route of an image sent to the frozen zero-shot model."""


class FeatureAutoencoder(nn.Module):
    """``width -> hidden -> width`` with a ReLU, and its threshold. (The official autoencoder also ends
    in a sigmoid and reads sigmoid-squashed features: docs/fidelity.md, B4.)"""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(width, hidden)
        self.decoder = nn.Linear(hidden, width)
        self.register_buffer("threshold", torch.tensor(float("inf")))

    def errors(self, features: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error per row."""
        reconstruction = self.decoder(torch.relu(self.encoder(features)))
        return (reconstruction - features).pow(2).mean(dim=-1)


def fit_autoencoder(autoencoder: FeatureAutoencoder, features: torch.Tensor, steps: int, lr: float,
                    batch_size: int, seed: int, runtime) -> list[float]:
    """Train on ``features`` with Adam (seeded mini-batches) through ``runtime.fit``, which owns the
    optimizer and the gradient average over processes; returns the first and last batch losses."""
    if len(features) == 0:
        raise DataError("DDAS: no features to train an autoencoder on")
    generator = torch.Generator().manual_seed(seed)

    def loss_of_step(step: int) -> torch.Tensor:
        rows = torch.randint(len(features), (min(batch_size, len(features)),), generator=generator)
        return autoencoder.errors(features[rows.to(features.device)]).mean()

    losses = runtime.fit(autoencoder, loss_of_step, steps, lr)
    autoencoder.requires_grad_(False)
    return [losses[0], losses[-1]]


class DistributionSelector(nn.Module):
    """The per-task autoencoders (index = task) and the optional pretraining-domain one."""

    def __init__(self, width: int, hidden: int, with_reference: bool) -> None:
        super().__init__()
        self.width, self.hidden = width, hidden
        self.autoencoders = nn.ModuleList()
        self.reference = FeatureAutoencoder(width, hidden) if with_reference else None
        # A buffer, so a resumed run knows the reference autoencoder was already trained.
        self.register_buffer("reference_trained", torch.tensor(False))

    def add_task(self) -> FeatureAutoencoder:
        like = next(self.parameters(), None)
        autoencoder = FeatureAutoencoder(self.width, self.hidden)
        if like is not None:
            autoencoder = autoencoder.to(like.device)
        autoencoder.requires_grad_(False)
        self.autoencoders.append(autoencoder)
        return autoencoder

    def fit_task(self, train_features: torch.Tensor, calibration_features: torch.Tensor, *, steps: int,
                 lr: float, batch_size: int, quantile: float, seed: int, runtime) -> dict[str, float]:
        """Add and train the next task's autoencoder; set its threshold from held-out features."""
        autoencoder = self.add_task()
        autoencoder.requires_grad_(True)
        first, last = fit_autoencoder(autoencoder, train_features, steps, lr, batch_size, seed, runtime)
        with torch.no_grad():
            held_out = autoencoder.errors(calibration_features if len(calibration_features) else train_features)
            autoencoder.threshold.fill_(float(torch.quantile(held_out.double(), quantile)))
        return {"first_loss": first, "last_loss": last, "threshold": float(autoencoder.threshold),
                "calibration_images": len(calibration_features)}

    def fit_reference(self, features: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
                      runtime) -> None:
        if self.reference is None:
            raise RuntimeError("DistributionSelector.fit_reference: built without a reference autoencoder")
        self.reference.requires_grad_(True)
        fit_autoencoder(self.reference, features, steps, lr, batch_size, seed, runtime)
        self.reference_trained.fill_(True)

    @torch.no_grad()
    def errors(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, tasks]`` reconstruction errors; each row depends only on its own image."""
        return torch.stack([autoencoder.errors(features) for autoencoder in self.autoencoders], dim=-1)

    @torch.no_grad()
    def route(self, features: torch.Tensor) -> torch.Tensor:
        """Per image: the task index whose autoencoder fits best, or ``ZERO_SHOT``."""
        routes = torch.full((len(features),), ZERO_SHOT, dtype=torch.long, device=features.device)
        if not len(self.autoencoders) or not len(features):
            return routes
        errors = self.errors(features.float())
        best_error, best_task = errors.min(dim=-1)
        thresholds = torch.stack([autoencoder.threshold for autoencoder in self.autoencoders])
        accepted = best_error <= thresholds[best_task]
        if self.reference is not None and bool(self.reference_trained):
            accepted &= best_error < self.reference.errors(features.float())
        routes[accepted] = best_task[accepted]
        return routes
