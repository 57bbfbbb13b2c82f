"""The Distribution Discriminative Auto-Selector (DDAS) of MoE-Adapters (Yu et al., CVPR 2024).

One small autoencoder per task learns to reconstruct that task's image features from a frozen
extractor (here: the frozen image tower's normalised embedding; the paper uses ImageNet AlexNet
features, which do not ship offline). At test time, for *each image*, the task whose autoencoder
reconstructs its features best is the candidate; the image goes to that task's router if the error
is within the task's threshold, and to the frozen zero-shot model otherwise. An optional extra
autoencoder for the pretraining domain (the paper trains it on Tiny-ImageNet) sends the images it
wins straight to zero-shot.

Two autoencoder shapes (``strategy.ddas_shape``), each with its own training recipe (:data:`RECIPES`):

- ``official`` follows the official code (JiazuoYu/MoE-Adapters4CL @ 4572d97,
  ``mtil/src/models/AutoEncoder.py``): the features are squashed with a sigmoid and that is both input
  and target; ``Linear(width, 100) -> ReLU -> Linear(100, width) -> Sigmoid``; the loss is the mean
  squared error over the batch and the feature dimensions. Adam with weight decay 1e-4 at lr 0.01,
  times 0.1 every 10 epochs (an epoch is one shuffled pass over the task's training features in
  batches of 64, the last one smaller), 300 steps per task and 1,000 for the reference autoencoder.
  Our features are unit-norm CLIP embeddings, whose entries are small, so the input sigmoid is close
  to the affine map ``0.5 + x / 4`` (on AlexNet's conv5 it truly squashes): the errors are about
  1/16 of the ``relu_mlp`` ones, which the calibrated thresholds absorb. Measured on the offline
  MoE-Adapters benchmark, it sends far fewer images to their own task's router and far fewer unseen
  photos to zero-shot than ``relu_mlp`` (docs/moe_adapters.md), so it is not the default.
- ``relu_mlp`` (the default) is the shape clipcl has always used (``Linear -> ReLU -> Linear`` on the raw features, no
  sigmoid anywhere, per-row MSE), with its recipe: Adam at lr 1e-3, no weight decay, a constant lr,
  batch 128 drawn with replacement, 300 steps for every autoencoder. ``ddas_shape: relu_mlp`` alone
  reproduces earlier clipcl numbers.

Thresholds are calibrated, not typed in: each task's threshold is the ``quantile`` (default 0.95)
of its own autoencoder's errors on images of that task held out from the autoencoder's training.
So about 5% of a task's own images are expected to fall back to zero-shot, and an image from a
domain no autoencoder has seen goes to zero-shot when it reconstructs worse than that. (The official
code uses one hand-set constant for all tasks and decides once per evaluation batch, on the batch's
mean error.) The calibration only compares errors of one autoencoder with each other, so it does not
depend on the error's scale, and so on the shape.
"""

from __future__ import annotations

import torch
from torch import nn

from clipcl.data.base import DataError

ZERO_SHOT = -1
"""The route of an image sent to the frozen zero-shot model."""

SHAPES = ("official", "relu_mlp")

RECIPES: dict[str, dict] = {
    # mtil/src/models/AutoEncoder.py @ 4572d97: Adam(weight_decay=1e-4) at :160, its lr overwritten on
    # every step by exp_lr_scheduler(..., 0.01) at :180 (x0.1 every 10 epochs, :49-63); batch 64 is
    # mtil/src/args.py:11; 300 iterations per task and 1,000 for the Tiny-ImageNet autoencoder in
    # mtil/scripts/train/train_full_shot_router11_experts22_1000iters.sh:27,43.
    "official": {"lr": 1e-2, "weight_decay": 1e-4, "lr_decay_epochs": 10, "batch_size": 64, "reference_steps": 1000},
    # clipcl's earlier recipe; the reference autoencoder trained for ``ddas_steps`` like the others.
    "relu_mlp": {"lr": 1e-3, "weight_decay": 0.0, "lr_decay_epochs": 0, "batch_size": 128, "reference_steps": None},
}
"""Each shape's training recipe, used for every ``strategy.ddas_*`` setting left unset (None)."""

LR_DECAY = 0.1
"""The official schedule's factor: the lr is multiplied by this every ``lr_decay_epochs`` epochs."""


class FeatureAutoencoder(nn.Module):
    """A ``width -> hidden -> width`` autoencoder with a ReLU in the middle, and its threshold.

    ``official``: ``sigmoid(decoder(relu(encoder(sigmoid(x)))))`` reconstructs ``sigmoid(x)``, as the
    official code (``mtil/src/models/AutoEncoder.py:13-31,185-189`` @ 4572d97). ``relu_mlp``: clipcl's
    earlier ``decoder(relu(encoder(x)))`` reconstructs ``x``. Both keep the same parameter names.
    """

    def __init__(self, width: int, hidden: int, shape: str = "official") -> None:
        super().__init__()
        if shape not in SHAPES:
            raise ValueError(f"DDAS autoencoder shape must be one of {', '.join(SHAPES)}, got {shape!r}")
        self.shape = shape
        self.encoder = nn.Linear(width, hidden)
        self.decoder = nn.Linear(hidden, width)
        self.register_buffer("threshold", torch.tensor(float("inf")))

    def target(self, features: torch.Tensor) -> torch.Tensor:
        """What the autoencoder reads and reconstructs: the features, sigmoid-squashed for ``official``."""
        return torch.sigmoid(features) if self.shape == "official" else features

    def reconstruct(self, target: torch.Tensor) -> torch.Tensor:
        output = self.decoder(torch.relu(self.encoder(target)))
        return torch.sigmoid(output) if self.shape == "official" else output

    def errors(self, features: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error per row (the official MSE of a batch of one image)."""
        target = self.target(features)
        return (self.reconstruct(target) - target).pow(2).mean(dim=-1)


def batches_per_epoch(count: int, batch_size: int) -> int:
    """Batches in one pass over ``count`` rows, the last one smaller (a DataLoader without drop_last)."""
    return -(-count // batch_size)


def lr_at_step(step: int, lr: float, steps_per_epoch: int, decay_epochs: int) -> float:
    """The official step schedule: ``lr * 0.1 ** (epoch // decay_epochs)`` with ``epoch = step //
    steps_per_epoch`` (``mtil/src/models/AutoEncoder.py:49-63,180`` @ 4572d97); constant if
    ``decay_epochs`` is 0."""
    if decay_epochs <= 0:
        return lr
    return lr * LR_DECAY ** ((step // steps_per_epoch) // decay_epochs)


def fit_autoencoder(autoencoder: FeatureAutoencoder, features: torch.Tensor, steps: int, lr: float,
                    batch_size: int, seed: int, runtime, *, weight_decay: float = 0.0,
                    lr_decay_epochs: int = 0) -> list[float]:
    """Train on ``features`` with Adam through ``runtime.fit``, which owns the optimizer and the gradient
    average over processes; returns the first and last batch losses.

    ``official``: seeded shuffled epochs (each a new permutation cut into batches, as the official
    shuffled DataLoader restarted every epoch); ``relu_mlp``: every batch drawn with replacement, as
    clipcl did before. The loss is the mean of the rows' errors, i.e. the MSE over the batch."""
    if len(features) == 0:
        raise DataError("DDAS: no features to train an autoencoder on")
    generator = torch.Generator().manual_seed(seed)
    count = len(features)
    per_epoch = batches_per_epoch(count, batch_size)
    order: list[torch.Tensor] = []

    def rows_of_step(step: int) -> torch.Tensor:
        if autoencoder.shape == "relu_mlp":
            return torch.randint(count, (min(batch_size, count),), generator=generator)
        if step % per_epoch == 0:
            order[:] = [torch.randperm(count, generator=generator)]
        position = (step % per_epoch) * batch_size
        return order[0][position: position + batch_size]

    def loss_of_step(step: int) -> torch.Tensor:
        rows = rows_of_step(step)
        return autoencoder.errors(features[rows.to(features.device)]).mean()

    losses = runtime.fit(autoencoder, loss_of_step, steps, lr, weight_decay=weight_decay,
                         lr_of_step=lambda step: lr_at_step(step, lr, per_epoch, lr_decay_epochs))
    autoencoder.requires_grad_(False)
    return [losses[0], losses[-1]]


class DistributionSelector(nn.Module):
    """The per-task autoencoders (index = task) and the optional pretraining-domain one."""

    def __init__(self, width: int, hidden: int, with_reference: bool, shape: str = "official") -> None:
        super().__init__()
        self.width, self.hidden, self.shape = width, hidden, shape
        self.autoencoders = nn.ModuleList()
        self.reference = FeatureAutoencoder(width, hidden, shape) if with_reference else None
        # A buffer, so a resumed run knows the reference autoencoder was already trained.
        self.register_buffer("reference_trained", torch.tensor(False))

    def add_task(self) -> FeatureAutoencoder:
        like = next(self.parameters(), None)
        autoencoder = FeatureAutoencoder(self.width, self.hidden, self.shape)
        if like is not None:
            autoencoder = autoencoder.to(like.device)
        autoencoder.requires_grad_(False)
        self.autoencoders.append(autoencoder)
        return autoencoder

    def fit_task(self, train_features: torch.Tensor, calibration_features: torch.Tensor, *, steps: int,
                 lr: float, batch_size: int, quantile: float, seed: int, runtime, weight_decay: float = 0.0,
                 lr_decay_epochs: int = 0) -> dict[str, float]:
        """Add and train the next task's autoencoder; set its threshold from held-out features."""
        autoencoder = self.add_task()
        autoencoder.requires_grad_(True)
        first, last = fit_autoencoder(autoencoder, train_features, steps, lr, batch_size, seed, runtime,
                                      weight_decay=weight_decay, lr_decay_epochs=lr_decay_epochs)
        with torch.no_grad():
            held_out = autoencoder.errors(calibration_features if len(calibration_features) else train_features)
            autoencoder.threshold.fill_(float(torch.quantile(held_out.double(), quantile)))
        return {"first_loss": first, "last_loss": last, "threshold": float(autoencoder.threshold),
                "calibration_images": len(calibration_features)}

    def fit_reference(self, features: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
                      runtime, weight_decay: float = 0.0, lr_decay_epochs: int = 0) -> None:
        if self.reference is None:
            raise RuntimeError("DistributionSelector.fit_reference: built without a reference autoencoder")
        self.reference.requires_grad_(True)
        fit_autoencoder(self.reference, features, steps, lr, batch_size, seed, runtime,
                        weight_decay=weight_decay, lr_decay_epochs=lr_decay_epochs)
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
