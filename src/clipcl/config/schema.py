"""The run config's schema: one dataclass per section, each with its range and consistency checks."""


from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipcl.config.checks import ConfigError, check_betas, check_choice, check_integer, check_number
from clipcl.config.time_schema import TimeConfig

BACKENDS = ("starter", "open_clip", "hf")
"""Valid values of ``model.backend``."""
LR_SCHEDULES = ("cosine", "constant", "step")
PROTOCOLS = ("class_incremental", "multi_domain", "xtail", "open_domain_til", "open_domain_cil", "si_blurry",
             "captions", "languages", "time")
"""Valid values of ``stream.protocol``."""
PRECISIONS = ("fp32", "bf16", "fp16")
"""Valid values of ``train.precision``."""
ACCELERATORS = ("auto", "cpu", "cuda")
"""Valid values of ``train.accelerator``."""


@dataclass
class ModelConfig:
    """Which model to continually train."""

    backend: str = "starter"
    """``starter`` (offline ConSE dual encoder, the default), ``open_clip`` or ``hf`` (transformers)."""
    name: str = "conse-efficientnet_lite0-minilm"
    """open_clip: an architecture name (``ViT-B-16``) or a JSON config file; hf: a local directory or
    hub id; starter: its variant name."""
    pretrained: str | None = None
    """open_clip: a pretrained tag (``openai``, downloads) or a local checkpoint file."""
    image_size: int | None = None
    """Override the input resolution (starter and open_clip; it trades speed for accuracy)."""
    weights: str | None = None
    """A ``.safetensors`` file of the backend's own weights (its ``state_dict()``, every key) loaded
    after the model is built: to continue from an earlier training (Mod-X starts from a COCO-trained
    CLIP; benchmarks/alignment.py from a Tux Paint phase). Read with safetensors, never pickle."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError, with a one-line message, on a value out of range."""
        check_choice("model.backend", self.backend, BACKENDS)
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"model.name must be a non-empty string, got {self.name!r}")
        check_integer("model.image_size", self.image_size, 1, optional=True)
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights.endswith(".safetensors")):
            raise ConfigError(f"model.weights must be a .safetensors file (or null), got {self.weights!r}")
        if self.backend == "starter" and self.pretrained is not None:
            raise ConfigError("model.pretrained is not used by the starter backend (its weights ship in its packages)")
        if self.backend == "hf" and self.pretrained is not None:
            raise ConfigError("model.pretrained is not used by the hf backend: its weights are the ones in "
                              "the directory or hub repository named by model.name")
        if self.backend == "hf" and self.image_size is not None:
            raise ConfigError("model.image_size is not supported by the hf backend; set the image processor's "
                              "size in the model directory instead")


@dataclass
class StreamConfig:
    """Which protocol and data."""

    protocol: str = "multi_domain"
    """``class_incremental``, ``multi_domain`` (MTIL, task id known), ``xtail`` (no domain id),
    ``open_domain_til`` / ``open_domain_cil`` (CoLeCLIP's open-domain TIL and CIL: shared class names are
    one class with pooled templates; CIL: no task id, seen tasks among the union of the seen classes,
    unseen ones among their own; see clipcl.data.open_domain) or ``si_blurry`` (one online stream with stochastic blurry task boundaries; see clipcl.engine.online) or
    ``captions`` (phases of image-caption pairs trained contrastively; see clipcl.data.caption_stream) or
    ``languages`` (one caption set, one language per task, CLL-CLIP's; see clipcl.data.languages) or
    ``time`` (image-caption pairs in time steps, TiC-CLIP's; the ``time`` section; see clipcl.data.time_stream)."""
    datasets: list[str] = field(default_factory=lambda: ["fashion_mnist", "mnist_5k", "digits"])
    """Datasets in training order (class_incremental uses the first one), or an order name
    such as ``mtil_order_1``. captions: caption sets (``tuxpaint``, ``openclipart``, a caption file, a
    webdataset shard pattern), one phase each; a single set is cut into ``num_tasks`` contiguous phases."""
    num_tasks: int = 5
    """Class-incremental: how many tasks the classes are split into. si_blurry: how many hidden tasks.
    captions with one caption set: how many contiguous phases it is cut into."""
    class_order_seed: int | None = None
    """Class-incremental only: seed of the class order (default: the run seed)."""
    train_samples_per_task: int | None = None
    """Cap on training images per task (seeded, class-balanced subset); None keeps all. si_blurry: per
    dataset of the stream."""
    test_samples_per_task: int | None = None
    """Cap on test images per task (seeded, class-balanced subset); None keeps all."""
    heldout: list[str] = field(default_factory=list)
    """Datasets never trained on, evaluated for zero-shot retention (captions: caption sets, whose test
    split is measured by retrieval)."""
    heldout_samples: int | None = None
    """Cap on held-out test images per dataset."""
    data_root: str | None = None
    """Where datasets live (torchvision layout). Default: ``$CLIPCL_DATA`` or ``~/.cache/clipcl/data``."""
    download: bool = False
    """Download missing torchvision datasets (needs internet)."""
    disjoint_class_ratio: float = 0.5
    """si_blurry: N, the share of classes that are disjoint (all their samples in one hidden task)."""
    blurry_sample_ratio: float = 0.1
    """si_blurry: M, the share of the blurry classes' samples that arrive in other hidden tasks."""
    languages: list[str] | None = None
    """languages: the order of the languages (codes as the set writes them, e.g. ``en``, ``de``,
    ``pt_BR``); None: English, then CLL-CLIP's order among those captioning ``min_translation_share``."""
    min_translation_share: float = 0.9
    """languages, without ``languages``: a language joins when it captions at least this share of the
    rows English does."""
    official_template_owners: bool = False
    """Open-domain protocols: prompt ``forest`` and ``river`` with EuroSAT's templates alone when EuroSAT
    is in the stream, as CoLeCLIP's code does (``engine/trainer.py:246-256``); default: they pool the
    templates of every dataset holding them, like every other shared class."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError, with a one-line message, on a value out of range."""
        check_choice("stream.protocol", self.protocol, PROTOCOLS)
        if not self.datasets:
            raise ConfigError("stream.datasets must name at least one dataset (or a stream order)")
        check_integer("stream.num_tasks", self.num_tasks, 1)
        check_integer("stream.class_order_seed", self.class_order_seed, 0, optional=True)
        for name in ("train_samples_per_task", "test_samples_per_task", "heldout_samples"):
            check_integer(f"stream.{name}", getattr(self, name), 1, optional=True)
        if self.languages is not None and (isinstance(self.languages, str) or not self.languages):
            raise ConfigError("stream.languages must be a non-empty list of language codes (or null)")
        for name in ("disjoint_class_ratio", "blurry_sample_ratio", "min_translation_share"):
            check_number(f"stream.{name}", getattr(self, name), 0.0, 1.0)


@dataclass
class TrainConfig:
    """The training loop, shared by every strategy."""

    epochs: int = 1
    """Passes over each task's training data."""
    max_steps_per_task: int | None = None
    """Stop a task after this many optimizer steps (None: full epochs)."""
    batch_size: int = 32
    """Images per micro-batch over all processes (split across them); an optimizer step sees
    ``batch_size * grad_accumulation`` images."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's two moment decays (torch's defaults; OpenCLIP's for ViTs and TiC-CLIP's official
    scripts use ``[0.9, 0.98]``)."""
    adam_eps: float = 1e-8
    """AdamW's epsilon (torch's default; OpenCLIP's for ViTs and TiC-CLIP's official scripts use ``1e-6``). A
    method's own parameter groups may set theirs (``cll_clip``'s ``adam_epsilon``)."""
    warmup_steps: int = 0
    """Linear warm-up steps, then cosine decay to zero within each task."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast with a gradient scaler; GPU only)."""
    devices: int = 1
    """Processes for data parallel training (gloo on CPU, nccl on GPU)."""
    accelerator: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    num_workers: int = 0
    """DataLoader worker processes."""
    max_grad_norm: float | None = 1.0
    """Clip gradients to this norm (None: no clipping)."""
    online_iter: int = 1
    """si_blurry: optimiser steps on each incoming batch (Si-Blurry's ``online_iter``)."""
    online_reaugment: bool = False
    """si_blurry: give each of the ``online_iter`` steps a fresh draw of the training transform on the
    same incoming images (LifeLong-CLIP's trainer re-augments every step). False: the batch is
    augmented once and reused. Changes nothing when the backend's training transform is deterministic
    (the starter's is)."""
    lr_schedule: str | None = None
    """``cosine`` (linear warm-up, then cosine decay to zero over each experience's steps),
    ``constant`` (warm-up, then the peak rate) or ``step`` (warm-up, then the rate times
    ``lr_step_gamma`` every ``lr_step_epochs`` epochs: ``StepLR``, as Ding et al. train; task streams
    only). None: cosine for task streams, constant for online streams (whose end the learner is not
    told; the online schedule spans the stream's length)."""
    lr_step_epochs: float = 10.0
    """``step`` schedule: epochs between two cuts (a fraction of an epoch is allowed; the cut falls
    on the nearest optimizer step, and on step 1 at the earliest)."""
    lr_step_gamma: float = 0.1
    """``step`` schedule: the factor of each cut."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError, with a one-line message, on a value out of range."""
        check_integer("train.epochs", self.epochs, 1)
        check_integer("train.max_steps_per_task", self.max_steps_per_task, 1, optional=True)
        check_integer("train.batch_size", self.batch_size, 1)
        check_integer("train.grad_accumulation", self.grad_accumulation, 1)
        check_number("train.lr", self.lr, 0.0, low_open=True)
        check_number("train.weight_decay", self.weight_decay, 0.0)
        self.adam_betas = check_betas("train.adam_betas", self.adam_betas)
        check_number("train.adam_eps", self.adam_eps, 0.0, low_open=True)
        check_integer("train.warmup_steps", self.warmup_steps, 0)
        check_choice("train.precision", self.precision, PRECISIONS)
        check_integer("train.devices", self.devices, 1)
        check_choice("train.accelerator", self.accelerator, ACCELERATORS)
        check_integer("train.num_workers", self.num_workers, 0)
        check_number("train.max_grad_norm", self.max_grad_norm, 0.0, low_open=True, optional=True)
        check_integer("train.online_iter", self.online_iter, 1)
        if not isinstance(self.online_reaugment, bool):
            raise ConfigError(f"train.online_reaugment must be true or false, got {self.online_reaugment!r}")
        if self.lr_schedule is not None:
            check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_number("train.lr_step_epochs", self.lr_step_epochs, 0.0, low_open=True)
        check_number("train.lr_step_gamma", self.lr_step_gamma, 0.0, low_open=True)
        # Every process takes an equal slice of each global batch (clipcl.engine.batches.GlobalBatchSampler).
        if self.batch_size % self.devices:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by train.devices "
                              f"({self.devices})")


@dataclass
class EvalConfig:
    """Evaluation after each task."""

    batch_size: int | None = None
    """Images per evaluation batch; None: chosen for the device (16 on CPU, 256 on a GPU; see
    docs/performance.md). Predictions are per image, but matmul kernels depend on the batch size, so
    another size may change a feature's last bits (and a prediction on a near-tie); the feature
    cache keys by it."""
    feature_cache: bool = True
    """Reuse image features while the image tower's weights are unchanged."""
    cache_dir: str | None = None
    """Also keep cached features on disk here (None: ``$CLIPCL_CACHE`` or ``~/.cache/clipcl/features``;
    ``""``: memory only)."""
    zero_shot_row: bool = True
    """Evaluate every task before training (the zero-shot row)."""
    retrieval: list[str] = field(default_factory=list)
    """Captioned sets for image-text retrieval R@1/5/10, measured before training and after each task:
    a caption file (``.json`` Karpathy/COCO/Flickr30k, ``.csv``, ``.tsv`` or ``.jsonl``; images relative to
    it) or a dataset name, whose test images get captions written from their labels with the dataset's
    templates (templated, not real, captions; see docs/metrics.md)."""
    retrieval_images: int | None = 500
    """At most this many images per templated retrieval set (class-balanced, fixed seed); None: all."""
    alignment: bool = True
    """Measure image-text alignment (modality gap, alignment/uniformity, rotation against the zero-shot
    and the previous model, similarity-structure correlation; docs/metrics.md) on every task's test set
    and every held-out set, before training and after each task, from the features the accuracy
    evaluation already computed (class prompts stand in for captions on labelled data)."""
    alignment_images: int | None = 500
    """At most this many images per set for the alignment measures (a fixed, class-balanced choice);
    None: all. Their features are kept in the run folder, for the next row's rotation and on resume."""
    eval_period: int = 1000
    """si_blurry: evaluate on all classes seen so far every this many stream samples (and at the end)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError, with a one-line message, on a value out of range."""
        check_integer("eval.batch_size", self.batch_size, 1, optional=True)
        check_integer("eval.retrieval_images", self.retrieval_images, 1, optional=True)
        check_integer("eval.alignment_images", self.alignment_images, 2, optional=True)
        check_integer("eval.eval_period", self.eval_period, 1)


@dataclass
class ObserveConfig:
    """What watches the run: progress bars and experiment trackers. None of it changes a number."""

    progress: bool = True
    """tqdm bars on stderr, one per experience (main process only)."""
    tensorboard: bool = True
    """TensorBoard event files under ``<output_dir>/tensorboard``; view with ``tensorboard --logdir runs/``."""
    wandb: bool = False
    """Weights & Biases, if ``wandb`` is installed; offline mode unless ``WANDB_MODE`` or ``WANDB_API_KEY``
    is set. Files go under ``<output_dir>/wandb``."""
    wandb_project: str = "clipcl"
    """The Weights & Biases project the run is logged to."""
    mlflow: bool = False
    """MLflow, if ``mlflow`` is installed; tracking URI from ``MLFLOW_TRACKING_URI``, else a SQLite store
    with its artifacts under ``<output_dir>/mlflow``."""
    mlflow_experiment: str = "clipcl"
    """The MLflow experiment the run is logged to."""
    log_every: int = 1
    """Training steps between logged step events (>= 1); bars still advance every step."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every < 1:
            raise ConfigError(f"observe.log_every must be an integer >= 1, got {self.log_every!r}")
        for name in ("wandb_project", "mlflow_experiment"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"observe.{name} must be a non-empty string, got {getattr(self, name)!r}")



@dataclass
class RunConfig:
    """A whole continual-learning run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "zero_shot"})
    """``name`` picks the strategy; the other keys are that strategy's Config fields."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    """Progress bars and experiment trackers (TensorBoard, W&B, MLflow); never changes a number."""
    time: TimeConfig = field(default_factory=TimeConfig)
    """Time-continual training (``stream.protocol: time``): mode, steps, budget."""
    seed: int = 0
    """Seeds class order, subsets, initialisation noise and data order."""
    output_dir: str = "runs/run"
    """Run directory: config, results, checkpoints, summary."""
    name: str | None = None
    """A label for reports (default: the strategy name)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Validate every section (again: a field may have been changed in place), the strategy section
        against its strategy's Config, and what the sections must agree on."""
        for section in (self.model, self.stream, self.train, self.eval, self.observe, self.time):
            section.validate()
        check_integer("seed", self.seed, 0)
        from clipcl.strategies import STRATEGIES, strategy_config

        strategy_config(self.strategy)
        # A method trains on labelled batches, caption batches or both (Strategy.batch_kinds): say so
        # now, not at the first training step.
        kind = "captions" if self.stream.protocol in ("captions", "languages", "time") else "labels"
        name = self.strategy.get("name")
        if kind not in STRATEGIES[name].batch_kinds:
            able = ", ".join(key for key, cls in STRATEGIES.items() if kind in cls.batch_kinds)
            stream = (f"stream.protocol={self.stream.protocol} (image-caption pairs)" if kind == "captions"
                      else "a labelled stream")
            raise ConfigError(f"strategy.name: {name!r} cannot train on {stream}; methods that can: {able}")
        if self.stream.protocol == "si_blurry":
            name = self.strategy.get("name")
            if STRATEGIES[name].needs_task_boundaries:
                online = ", ".join(key for key, cls in STRATEGIES.items() if not cls.needs_task_boundaries)
                raise ConfigError(f"strategy.name: {name!r} needs task boundaries; stream.protocol=si_blurry has "
                                  f"none (online strategies: {online})")
            if self.train.lr_schedule == "step":
                raise ConfigError("train.lr_schedule: step cuts the rate every few epochs; stream.protocol=si_blurry "
                                  "has no epochs (use cosine or constant)")

    @property
    def label(self) -> str:
        return self.name or str(self.strategy.get("name", "run"))
