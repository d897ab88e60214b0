"""Trainer configuration: frozen dataclasses loaded from ``configs/train/*.yaml`` + ``--set`` overrides.

Shared by SFT (``training/sft.py``), eval (``training/eval.py``) and, for the
``model``/``data`` sections, GRPO. Paths are relative to the working directory
the command runs in (the repository root for ``make``); no absolute paths in
committed YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from annotators.training_prompt import CAMERAS_FOR_MODEL
from training.model import ModelConfig

# Shipped configs, found next to the package rather than the working directory.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "train"


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = "data"  # <data_dir>/codebook/codebook.json gives K
    train_files: str = "data/build/shards/train-*.parquet"  # glob(s), comma separated
    val_files: str = "data/build/shards/validation-*.parquet"
    cameras: tuple[str, ...] = CAMERAS_FOR_MODEL
    batch_size: int = 2  # micro-batch per rank
    num_workers: int = 0  # DataLoader decode workers per rank
    length_group_size: int = 16  # batches per length-sorting window (1 = no grouping)
    max_length: int = 8192  # tokens; longer samples are an error naming the sample
    check_stored_messages: bool = True  # stored `messages` must equal the prompt builder's output
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.length_group_size < 1 or self.num_workers < 0:
            raise ValueError("data.batch_size and data.length_group_size must be >= 1, num_workers >= 0")


@dataclass(frozen=True)
class LossConfig:
    slow_weight: float = 40.0  # w_i for slow-thinking samples (fast samples: 1)
    action_weight: float = 1.0  # lambda_a on the action-token CE
    weighting: str = "sample"  # sample: w_i * each sample's mean token loss | token: w_i on every token

    def __post_init__(self) -> None:
        if self.weighting not in ("sample", "token"):
            raise ValueError(f"loss.weighting must be sample|token, got {self.weighting!r}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step per rank


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "out/sft"
    max_steps: int = 1000
    epochs: int = 1000  # upper bound; max_steps usually ends the run
    seed: int = 0
    precision: str = "bf16"  # bf16 (autocast / FSDP mixed precision, fp32 master) or fp32
    parallel: str = "auto"  # auto | fsdp | ddp | none
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 0  # steps; 0 = no in-training eval
    eval_samples: int = 64
    max_new_tokens: int = 256
    resume: str = "auto"  # auto (latest in out_dir) | none | <checkpoint dir>
    wandb_project: str = ""  # logged when set and wandb is installed
    tensorboard: bool = False
    peak_tflops: float = 989.0  # per device, for the MFU estimate (H100 bf16 dense)
    cpu_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default (tiny models: 1 is fastest)

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.parallel not in ("auto", "fsdp", "ddp", "none"):
            raise ValueError(f"parallel must be auto|fsdp|ddp|none, got {self.parallel!r}")
