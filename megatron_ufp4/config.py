"""Typed run configuration: YAML sections → dataclasses, with dotted CLI overrides.

    cfg = load_config("configs/tiny_dense.yaml", ["recipe.name=e2m1_ref", "optimizer.lr=3e-4"])

Unknown keys, wrong types and impossible values raise ``ConfigError`` with one line that
names the offending key.  ``cfg.to_dict()`` is the resolved config (printed at start and
saved with every checkpoint).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .fp4.recipes import Recipe
from .model.config import ModelConfig


class ConfigError(ValueError):
    """A user error in a config file or override (reported as one line, no traceback)."""


@dataclass
class DataConfig:
    prefix: str = "data/shakespeare/shakespeare"  # prepared dataset: <prefix>_train.bin/.idx, <prefix>_val.*, <prefix>.model
    seq_len: int = 256


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: the final fraction of steps spent decaying


@dataclass
class TrainingConfig:
    run_dir: str = "runs/default"
    seed: int = 1234
    train_steps: int = 200
    micro_batch_size: int = 8
    global_batch_size: int = 8  # = micro_batch_size x accumulation steps x data-parallel size
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    eval_interval: int = 50
    eval_iters: int = 10
    max_consecutive_nonfinite: int = 5  # abort after this many skipped steps in a row
    resume: str = "auto"  # auto (latest checkpoint in run_dir) | none | <checkpoint path>


@dataclass
class CheckpointConfig:
    interval: int = 100
    keep_last: int = 2
    save_final: bool = True


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: bool = False
    wandb_project: str = "megatron_ufp4"
    wandb_mode: str = "offline"  # offline needs no account
    tensorboard: bool = False


@dataclass
class ParallelConfig:
    """Sizes must multiply to the world size (data may be left 0: the rest of the world)."""
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1  # carved out of data: experts sharded over groups of this many DP ranks
    data: int = 0
    virtual_pipeline: int = 1  # > 1: interleaved 1F1B with this many model chunks per rank
    sequence_parallel: bool = False
    pipeline_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b | gpipe
    first_stage_layers: int | None = None  # uneven split: layers on the first/last stage
    last_stage_layers: int | None = None
    expert_dispatcher: str = "alltoall"  # alltoall | allgather
    zero1: bool = True  # shard optimizer state over data-parallel ranks
    timeout_s: float = 600.0  # a rank that dies or hangs makes the others exit after this


@dataclass
class RunConfig:
    model: ModelConfig
    recipe: dict = field(default_factory=lambda: {"name": "ufp4"})  # Recipe.from_dict input (+ backend)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def build_recipe(self) -> tuple[Recipe, str]:
        spec = dict(self.recipe)
        backend = spec.pop("backend", "emulated")
        return Recipe.from_dict(spec), backend

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        try:
            self.model.validate()
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        try:
            self.build_recipe()
        except ValueError as e:
            raise ConfigError(f"recipe: {e}") from None
        t, s, o = self.training, self.schedule, self.optimizer
        checks = [
            (t.train_steps > 0, "training.train_steps must be > 0"),
            (t.micro_batch_size > 0, "training.micro_batch_size must be > 0"),
            (t.global_batch_size % (t.micro_batch_size * max(1, self.parallel.data)) == 0,
             "training.global_batch_size must be a multiple of micro_batch_size x parallel.data"),
            (t.dtype in ("fp32", "bf16"), f"training.dtype must be fp32 or bf16 (got {t.dtype!r})"),
            (t.device in ("auto", "cpu", "cuda"), f"training.device must be auto, cpu or cuda (got {t.device!r})"),
            (t.eval_interval >= 0 and t.eval_iters >= 0, "training.eval_interval/eval_iters must be >= 0"),
            (t.max_consecutive_nonfinite >= 1, "training.max_consecutive_nonfinite must be >= 1"),
            (0 < o.lr < float("inf"), "optimizer.lr must be a finite number > 0"),
            (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optimizer.beta1/beta2 must be in [0, 1)"),
            (o.grad_clip >= 0, "optimizer.grad_clip must be >= 0"),
            (s.kind in ("cosine", "wsd", "constant"), f"schedule.kind must be cosine, wsd or constant (got {s.kind!r})"),
            (0 <= s.warmup_steps, "schedule.warmup_steps must be >= 0"),
            (0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in [0, 1]"),
            (0 < s.decay_fraction <= 1, "schedule.decay_fraction must be in (0, 1]"),
            (self.data.seq_len > 0, "data.seq_len must be > 0"),
            (self.data.seq_len <= self.model.max_seq_len, "data.seq_len must be <= model.max_seq_len"),
            (self.checkpoint.interval >= 0 and self.checkpoint.keep_last >= 1,
             "checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1"),
            (self.logging.interval > 0, "logging.interval must be > 0"),
            (self.logging.wandb_mode in ("offline", "online", "disabled"),
             "logging.wandb_mode must be offline, online or disabled"),
            (all(v >= 1 for v in (self.parallel.tensor, self.parallel.pipeline, self.parallel.expert,
                                   self.parallel.virtual_pipeline)) and self.parallel.data >= 0,
             "parallel sizes must be >= 1 (parallel.data may be 0: the rest of the world)"),
            (self.parallel.pipeline_schedule in ("1f1b", "interleaved_1f1b", "gpipe"),
             "parallel.pipeline_schedule must be 1f1b, interleaved_1f1b or gpipe"),
            (self.parallel.expert_dispatcher in ("alltoall", "allgather"),
             "parallel.expert_dispatcher must be alltoall or allgather"),
            (self.parallel.timeout_s > 0, "parallel.timeout_s must be > 0"),
        ]
        floats = [("optimizer." + f.name, getattr(o, f.name)) for f in dataclasses.fields(o)]
        floats += [("schedule.min_lr_ratio", s.min_lr_ratio), ("schedule.decay_fraction", s.decay_fraction)]
        for key, v in floats:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key} must be finite (got {v})")
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


# -- generic typed loading -----------------------------------------------------------------
def _check_type(value, tp, key):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is float:
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp in (int, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        return [(_check_type(v, args[0], f"{key}[{i}]") if args else v) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    return value


def _build(cls, d, prefix):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown config key {prefix + '.' if prefix else ''}{sorted(unknown)[0]}")
    kwargs = {k: _check_type(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def apply_override(d: dict, override: str) -> None:
    """``a.b.c=value`` (value parsed as YAML: 3e-4, true, [1, 2], null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}") from None
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def config_from_dict(d: dict) -> RunConfig:
    if "model" not in d:
        raise ConfigError("config has no model section")
    return _build(RunConfig, d, "").validate()


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    d: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        d.update(loaded)
    for o in overrides:
        apply_override(d, o)
    return config_from_dict(d)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
