"""MoE-Adapters with the Distribution Discriminative Auto-Selector (Yu et al., CVPR 2024).

The pretrained model stays frozen. Every supported block of the chosen towers gets ``num_experts``
expert adapters and, per task (``routers: per_task``) or for the whole stream (``routers: shared``),
a router with noisy top-k gating (:mod:`clipcl.adapt.moe`). A task trains its router and
the experts not yet frozen, with the CLIP cross-entropy over the task's class prompts (the text side
runs through the text tower's experts with the same router). After the task, the
``freeze_experts_per_task`` experts its router chose most often in each block are frozen for good, so
later tasks can reuse them but not overwrite them.

At test time each image is routed on its own (:mod:`clipcl.strategies.ddas`): ``selector: ddas`` picks
the task whose autoencoder reconstructs the image's frozen features best, or the frozen zero-shot model
when none fits; ``selector: none`` sends every image through the most recent router (no selector,
no task id). The class prompts are encoded with the same route as the image they are compared with.

Two configurations by name (``clipcl run moe_adapters_mtil`` / ``moe_adapters_cil``), from the
official code's scripts: MTIL -- 22 experts, top-2, a router per task, freeze 2 per task, DDAS,
label smoothing 0.2, lr 1e-3, AdamW without weight decay; class-incremental -- 2 experts, top-2, one
shared router, no freezing, no selector, lr 1e-3, no label smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.adapt.moe import MoEAdapter, active_router, inject_moe_adapters
from clipcl.config import ConfigError
from clipcl.data.sources import ReferenceSpec
from clipcl.losses import classification_loss, clip_logits, normalize
from clipcl.strategies.base import (
    Strategy,
    StrategyConfig,
    class_text_features,
    hash_module,
    require_batch_kind,
)
from clipcl.strategies.ddas import RECIPES, SHAPES, ZERO_SHOT, DistributionSelector

TOWERS = {"all": ("image", "text"), "image": ("image",), "text": ("text",)}
ROUTERS = ("per_task", "shared")
SELECTORS = ("ddas", "none")


@dataclass
class MoEAdaptersConfig(StrategyConfig):
    train: str = "all"
    """Towers that get experts: ``all`` (both, as the paper), ``image`` or ``text``."""
    num_experts: int = 22
    """Experts per block (MTIL: 22; class-incremental: 2)."""
    top_k: int = 2
    """Experts each sample uses per block."""
    routers: str = "per_task"
    """``per_task`` (a new router for every task, MTIL) or ``shared`` (one router, class-incremental)."""
    bottleneck: int = 64
    """Width of each expert's bottleneck (64 in the paper and code)."""
    scale: float = 0.1
    """The mixture's output is multiplied by this (0.1)."""
    dropout: float = 0.1
    """Dropout inside each expert while training (0.1)."""
    freeze_experts_per_task: int = 2
    """After each task, freeze this many of the most-chosen experts of every block (0: never freeze)."""
    label_smoothing: float = 0.2
    """Label smoothing of the cross-entropy (0.2 in the MTIL scripts, as ZSCL)."""
    selector: str = "ddas"
    """Routing at test time: ``ddas`` (per-image autoencoders, zero-shot fallback) or ``none`` (the most
    recent router for every image)."""
    ddas_shape: str = "relu_mlp"
    """The autoencoders' shape and training recipe (:mod:`clipcl.strategies.ddas`): ``relu_mlp`` (the
    default: ``Linear -> ReLU -> Linear`` on the raw features) or ``official`` (sigmoid on the
    features, ``Linear -> ReLU -> Linear -> Sigmoid``, MSE, Adam at 0.01, as the official code). On
    unit-norm CLIP-style embeddings the official shape tells the domains apart much worse (measured:
    docs/moe_adapters.md), so it is an option, not the default."""
    ddas_hidden: int = 100
    """Hidden width of each autoencoder (100 in the official code)."""
    ddas_steps: int = 300
    """Adam steps per task autoencoder (300 iterations in the official script)."""
    ddas_lr: float | None = None
    """Adam learning rate of the autoencoders. None: the shape's own -- official 0.01 (the rate the
    official code actually steps with), relu_mlp 1e-3."""
    ddas_weight_decay: float | None = None
    """Adam's (L2) weight decay of the autoencoders. None: official 1e-4, relu_mlp 0."""
    ddas_lr_decay_epochs: int | None = None
    """The lr is multiplied by 0.1 every this many epochs over the task's training features (0: a
    constant lr). None: official 10, relu_mlp 0."""
    ddas_batch_size: int | None = None
    """Mini-batch size of the autoencoders. None: official 64, relu_mlp 128."""
    ddas_reference_steps: int | None = None
    """Adam steps of the pretraining-domain autoencoder (``ddas_reference``). None: official 1,000 (the
    official script's Tiny-ImageNet autoencoder), relu_mlp ``ddas_steps``."""
    ddas_calibration_fraction: float = 0.2
    """Share of each task's training images held out from its autoencoder to calibrate its threshold."""
    ddas_quantile: float = 0.95
    """A task's threshold is this quantile of its autoencoder's errors on the held-out images."""
    ddas_reference: str | None = None
    """A dataset (any ``load_dataset`` name, train split) standing for the pretraining domain; its
    autoencoder sends the images it reconstructs best to zero-shot. The paper uses Tiny-ImageNet;
    None: thresholds alone decide (the offline default -- the only offline natural photos are the
    held-out probe, which must not be trained on)."""
    ddas_reference_samples: int = 1000
    """At most this many reference images (a seeded draw)."""

    def validate(self) -> None:
        if self.train not in TOWERS:
            raise ConfigError(f"strategy.train must be one of {', '.join(TOWERS)} for moe_adapters, got {self.train!r}")
        if self.routers not in ROUTERS:
            raise ConfigError(f"strategy.routers must be one of {', '.join(ROUTERS)}, got {self.routers!r}")
        if self.selector not in SELECTORS:
            raise ConfigError(f"strategy.selector must be one of {', '.join(SELECTORS)}, got {self.selector!r}")
        if not 0 <= self.freeze_experts_per_task <= self.num_experts:
            raise ConfigError("strategy.freeze_experts_per_task must be between 0 and num_experts")
        if not 0.0 <= self.ddas_calibration_fraction < 1.0:
            raise ConfigError("strategy.ddas_calibration_fraction must be in [0, 1)")
        if not 0.0 < self.ddas_quantile <= 1.0:
            raise ConfigError("strategy.ddas_quantile must be in (0, 1]")
        if self.ddas_shape not in SHAPES:
            raise ConfigError(f"strategy.ddas_shape must be one of {', '.join(SHAPES)}, got {self.ddas_shape!r}")
        recipe = self.ddas_recipe()
        if recipe["lr"] <= 0 or recipe["weight_decay"] < 0 or recipe["lr_decay_epochs"] < 0:
            raise ConfigError("strategy.ddas_lr must be > 0, ddas_weight_decay and ddas_lr_decay_epochs >= 0")
        if recipe["batch_size"] < 1 or recipe["reference_steps"] < 1 or self.ddas_steps < 1:
            raise ConfigError("strategy.ddas_batch_size, ddas_steps and ddas_reference_steps must be >= 1")
        super().validate()

    def ddas_recipe(self) -> dict:
        """The autoencoders' training settings: each ``ddas_*`` value, or the shape's own where None."""
        recipe = dict(RECIPES[self.ddas_shape])
        for key in ("lr", "weight_decay", "lr_decay_epochs", "batch_size", "reference_steps"):
            value = getattr(self, f"ddas_{key}")
            if value is not None:
                recipe[key] = value
        if recipe["reference_steps"] is None:
            recipe["reference_steps"] = self.ddas_steps
        return recipe


class MoEAdapters(Strategy):
    Config = MoEAdaptersConfig
    needs_task_boundaries = True

    def __init__(self, backend, config: MoEAdaptersConfig) -> None:
        super().__init__(backend, config)
        # The frozen image tower's identity, taken before any expert exists: DDAS features are exactly
        # the zero-shot model's image features, so they share its cache entries.
        self._frozen_image_key = f"{backend.model_id}|{backend.preprocess_id}|{hash_module(backend.image_tower)}"
        backend.requires_grad_(False)
        self.layers: list[MoEAdapter] = inject_moe_adapters(
            backend, TOWERS[config.train], config.num_experts, config.top_k, config.bottleneck, config.scale,
            config.dropout)
        self.selector = (DistributionSelector(backend.embed_dim, config.ddas_hidden, config.ddas_reference is not None,
                                              config.ddas_shape)
                         if config.selector == "ddas" else None)
        self.trained_tasks = 0
        self.ddas_fits: list[dict] = []

    # --- structure -------------------------------------------------------------------------------
    def _router_for_task(self, task_index: int) -> int:
        return task_index if self.config.routers == "per_task" else 0

    def _ensure_router(self, router: int) -> None:
        for layer in self.layers:
            while len(layer.routers) <= router:
                layer.add_router()

    def restore_structure(self, completed) -> None:
        for task in completed:
            self._ensure_router(self._router_for_task(task.index))
            if self.selector is not None and len(self.selector.autoencoders) <= task.index:
                self.selector.add_task()
        self.trained_tasks = len(completed)
        self._apply_freezing()

    def _apply_freezing(self) -> None:
        for layer in self.layers:
            for index, expert in enumerate(layer.experts):
                expert.requires_grad_(not bool(layer.frozen[index]))

    # --- training --------------------------------------------------------------------------------
    def before_task(self, task) -> None:
        if self.selector is not None and self.selector.reference is not None and not bool(self.selector.reference_trained):
            self._fit_reference()
        router = self._router_for_task(task.index)
        self._ensure_router(router)
        self.backend.requires_grad_(False)
        for layer in self.layers:
            layer.selection_counts.zero_()
            for index, current in enumerate(layer.routers):
                current.requires_grad_(index == router)
        self._apply_freezing()

    def forward(self, batch, task):
        require_batch_kind(self, batch)
        images, targets = batch["images"], batch["targets"]
        with active_router(self.layers, self._router_for_task(task.index), training=True):
            image_features = normalize(self.backend.encode_image(images))
            text_features = class_text_features(self.backend, task.classes, ensemble=False)
        logits = clip_logits(image_features, text_features, self.backend.logit_scale)
        loss = classification_loss(logits, targets, self.config.label_smoothing)
        return {"loss": loss, "accuracy": (logits.argmax(dim=-1) == targets).float().mean().detach()}

    def after_task(self, task) -> None:
        count = self.config.freeze_experts_per_task
        # Each process counted its own shard of the task: sum, so every process freezes the same experts.
        for layer in self.layers:
            self.runtime.all_reduce_sum(layer.selection_counts)
        if count:
            for layer in self.layers:
                # The experts this task's router chose most often (counted per sample, as the official
                # code); ties go to the lower index.
                most_chosen = torch.argsort(-layer.selection_counts, stable=True)[:count]
                layer.frozen[most_chosen] = True
        self._apply_freezing()
        if self.selector is not None:
            self._fit_task_autoencoder(task)
        self.trained_tasks = task.index + 1

    # --- DDAS --------------------------------------------------------------------------------------
    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The zero-shot model's normalised image features (every mixture off)."""
        with active_router(self.layers, None):
            return normalize(self.backend.encode_image(images))

    def _features_of(self, dataset) -> torch.Tensor:
        from clipcl.eval.evaluator import encode_dataset

        # Every process computes all features (no sharding), so all processes fit the same autoencoders.
        # They are the zero-shot model's features, so they share its cache entries.
        features, _, _ = encode_dataset(lambda images: (self.frozen_image_features(images), None),
                                        self._frozen_image_key, dataset, self.backend, self.runtime.unsharded(),
                                        batch_size=128, cache=self.feature_cache)
        return features.float()

    def _fit_task_autoencoder(self, task) -> None:
        config = self.config
        features = self._features_of(task.train)
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(1000 + task.index))
        held = round(config.ddas_calibration_fraction * len(features))
        calibration, train = features[order[:held]], features[order[held:]]
        recipe = config.ddas_recipe()
        fit = self.selector.fit_task(train, calibration, steps=config.ddas_steps, lr=recipe["lr"],
                                     batch_size=recipe["batch_size"], quantile=config.ddas_quantile,
                                     seed=2000 + task.index, runtime=self.runtime,
                                     weight_decay=recipe["weight_decay"], lr_decay_epochs=recipe["lr_decay_epochs"])
        self.ddas_fits.append({"task": task.name, **fit})

    def sources(self) -> dict:
        if self.selector is None or self.config.ddas_reference is None:
            return {}
        # Only the dataset: its features are encoded once, for the pretraining-domain autoencoder.
        return {"ddas_reference": ReferenceSpec(dataset=self.config.ddas_reference,
                                                samples=self.config.ddas_reference_samples, per_step=False)}

    def _fit_reference(self) -> None:
        dataset = self.source_data["ddas_reference"].dataset
        recipe = self.config.ddas_recipe()
        self.selector.fit_reference(self._features_of(dataset), steps=recipe["reference_steps"], lr=recipe["lr"],
                                    batch_size=recipe["batch_size"], seed=3000, runtime=self.runtime,
                                    weight_decay=recipe["weight_decay"], lr_decay_epochs=recipe["lr_decay_epochs"])

    # --- evaluation ----------------------------------------------------------------------------------
    def route_images(self, frozen_features: torch.Tensor) -> torch.Tensor:
        """Per image: the router to use, or ``ZERO_SHOT`` (-1)."""
        count = len(frozen_features)
        if self.trained_tasks == 0:
            return torch.full((count,), ZERO_SHOT, dtype=torch.long, device=frozen_features.device)
        if self.selector is None:
            last = self._router_for_task(self.trained_tasks - 1)
            return torch.full((count,), last, dtype=torch.long, device=frozen_features.device)
        tasks = self.selector.route(frozen_features)
        if self.config.routers == "shared":
            tasks = torch.where(tasks == ZERO_SHOT, tasks, torch.zeros_like(tasks))
        return tasks

    def encode_images_routed(self, images: torch.Tensor, task_index: int | None):
        if self.selector is None and self.trained_tasks > 0:
            # No selector: every image takes the latest router, and no frozen pass is needed to decide.
            last = self._router_for_task(self.trained_tasks - 1)
            with active_router(self.layers, last):
                features = normalize(self.backend.encode_image(images))
            return features, torch.full((len(images),), last, dtype=torch.long, device=features.device)
        frozen = self.frozen_image_features(images)
        routes = self.route_images(frozen)
        features = frozen.clone()
        for route in routes.unique().tolist():
            if route == ZERO_SHOT:
                continue
            rows = (routes == route).nonzero().squeeze(-1)
            with active_router(self.layers, route):
                features[rows] = normalize(self.backend.encode_image(images[rows])).to(features.dtype)
        return features, routes

    def encode_images(self, images: torch.Tensor, task_index: int | None) -> torch.Tensor:
        return self.encode_images_routed(images, task_index)[0]

    def encode_classes_routed(self, classes, task_index: int | None, route: int) -> torch.Tensor:
        with active_router(self.layers, None if route == ZERO_SHOT else route):
            return class_text_features(self.backend, classes, ensemble=True)

    def encode_classes(self, classes, task_index: int | None) -> torch.Tensor:
        last = ZERO_SHOT if self.trained_tasks == 0 else self._router_for_task(self.trained_tasks - 1)
        return self.encode_classes_routed(classes, task_index, last)

    def image_cache_key(self, task_index: int | None) -> str | None:
        return None  # the features depend on each image's route

    def text_cache_key(self, task_index: int | None) -> str | None:
        return None  # routed text paths (and the router state) shape the features: not cached across rows

    # --- reporting -----------------------------------------------------------------------------------
    def parameter_report(self) -> dict[str, int]:
        """Counted from the modules: what trains, what one task adds, what is stored in total."""
        def count(parameters) -> int:
            return sum(parameter.numel() for parameter in parameters)

        experts = count(p for layer in self.layers for p in layer.experts.parameters())
        routers = count(p for layer in self.layers for p in layer.routers.parameters())
        one_router = count(p for layer in self.layers if layer.routers for p in layer.routers[0].parameters())
        autoencoders = count(self.selector.autoencoders.parameters()) if self.selector is not None else 0
        one_autoencoder = (count(self.selector.autoencoders[0].parameters())
                           if self.selector is not None and len(self.selector.autoencoders) else 0)
        reference = (count(self.selector.reference.parameters())
                     if self.selector is not None and self.selector.reference is not None else 0)
        frozen_experts = sum(int(layer.frozen.sum()) for layer in self.layers)
        trainable_experts = count(p for layer in self.layers for p in layer.experts.parameters() if p.requires_grad)
        backbone = count(self.backend.parameters()) - experts - routers
        return {
            "trainable_last_task": trainable_experts + one_router,
            "stored_per_task": one_router + one_autoencoder,
            "experts": experts,
            "routers": routers,
            "autoencoders": autoencoders + reference,
            "total_stored": experts + routers + autoencoders + reference,
            "frozen_backbone": backbone,
            "moe_blocks": len(self.layers),
            "experts_frozen": frozen_experts,
            "experts_total": sum(layer.num_experts for layer in self.layers),
        }

    @torch.no_grad()
    def final_report(self, stream, runtime) -> dict:
        """Parameter accounting and, with DDAS, how the test images were routed."""
        self.eval()
        report: dict = {"parameters": self.parameter_report()}
        if self.selector is None:
            return report
        def shares(dataset, own: int | None = None) -> dict:
            routes = self.route_images(self._features_of(dataset))
            share = {"images": len(routes), "zero_shot": 100.0 * float((routes == ZERO_SHOT).float().mean())}
            if own is not None:
                share["own_router"] = 100.0 * float((routes == own).float().mean())
            return share

        per_task = [{"task": task.name, **shares(task.test, self._router_for_task(task.index))}
                    for task in stream.tasks[: self.trained_tasks]]
        unseen = [{"task": task.name, **shares(task.test)} for task in stream.tasks[self.trained_tasks:]]
        heldout = [{"set": held.name, **shares(held.test)} for held in stream.heldout]
        report["routing"] = {"trained_tasks": per_task, "untrained_tasks": unseen, "heldout": heldout,
                             "unit": "percent of test images",
                             "thresholds": [float(autoencoder.threshold) for autoencoder in self.selector.autoencoders],
                             # Training losses of the autoencoders fitted in this process (a resumed run
                             # lists only the tasks it trained itself).
                             "autoencoders": self.ddas_fits}
        return report
