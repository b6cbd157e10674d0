"""Typed run configuration: YAML sections → dataclasses, with dotted CLI overrides.

    cfg = load_config("configs/tiny_dense.yaml", ["recipe.name=e2m1_ref", "optimizer.lr=3e-4"])

Unknown keys, wrong types and impossible values raise ``ConfigError`` with one line that
names the offending key.  ``model: {preset: NAME, <field>: ...}`` starts from the preset
shape of ``megatron_ufp4/model/config.py`` with the given fields on top.  ``cfg.to_dict()``
is the resolved config, every model field spelled out (printed at start and saved with
every checkpoint).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.blend import BlendError, SplitSource, data_sources
from .fp4.recipes import Recipe
from .fp4.schedule import PrecisionSchedule, base_recipe_config
from .linear.backends import available_backends
from .model.config import ModelConfig, upgrade_saved_model, with_preset
from .yaml_files import yaml_load


class ConfigError(ValueError):
    """A user error in a config file or override (reported as one line, no traceback)."""


@dataclass
class DataConfig:
    # a dataset made by our prepare: <prefix>_train.bin/.idx, <prefix>_val.*, its tokenizer and <prefix>.json
    prefix: str = "data/shakespeare/shakespeare"
    seq_len: int = 256
    # Megatron-LM corpora instead of prefix (docs/data.md): one .bin/.idx prefix, or "weight prefix" pairs
    # (a list or one string), cut into train/valid/test by split unless valid_path names the validation set
    path: list | str | None = None
    split: str | None = None  # null: 969,30,1 (Megatron-LM's default) unless valid_path / test_path name the sets
    valid_path: list | str | None = None
    test_path: list | str | None = None
    # sentencepiece .model, tokenizer.json or a directory holding one; null: the one stored with the dataset
    tokenizer: str | None = None

    def corpora(self) -> dict[str, SplitSource] | None:
        """train/valid/test sources of ``path`` (None when the run reads ``prefix``); settings that
        would be ignored are refused in one line."""
        try:
            return data_sources(self.path, self.split, self.valid_path, self.test_path)
        except BlendError as e:
            raise ConfigError(str(e)) from None

    def describe(self) -> str:
        """Where the run's tokens come from, as the setting that names them."""
        return f"data.prefix={self.prefix}" if self.path is None else f"data.path={self.path}"


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
    device: str = "auto"  # auto (cuda:LOCAL_RANK when CUDA exists, else cpu) | cpu | cuda | cuda:N
    eval_interval: int = 50
    eval_iters: int = 10
    # activation recomputation (Megatron-LM's names; docs/parallel.md): none | selective (core attention) |
    # full (whole layers: recompute_method uniform = every layer, block = the first recompute_num_layers of
    # each model chunk)
    recompute_granularity: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    # fixed validation windows (seq_len tokens each, the val split's first ones) per evaluation;
    # null: eval_iters x micro_batch_size.  Logged with the per-window standard error
    eval_windows: int | None = None
    sr_seed: int | None = None  # base of the stochastic-rounding draws; null: training.seed (init and data order)
    cpu_threads: int = 0  # torch intra-op threads; 0: the usable cores / the processes on this node
    max_consecutive_nonfinite: int = 5  # abort after this many skipped steps in a row
    resume: str = "auto"  # auto (latest checkpoint in run_dir) | none | <checkpoint path>
    overwrite: bool = False  # start afresh in a run_dir holding another run: move that run aside (never deleted)
    # a fresh start (nothing to resume) takes its model weights from this checkpoint (e.g. tools/import_hf.py's
    # state.pt): weights only, fresh optimizer, step 0; null: initialise from training.seed
    init_from: str | None = None


@dataclass
class CheckpointConfig:
    interval: int = 100
    keep_last: int = 2
    save_final: bool = True
    save_on_signal: bool = True  # SIGTERM/SIGINT: all ranks stop at the next step boundary, save, exit


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: bool = False
    wandb_project: str = "megatron_ufp4"
    wandb_mode: str = "offline"  # offline needs no account
    tensorboard: bool = False
    # every N steps: per layer and GEMM, each quantized operand's alpha, SQNR, amax, saturated and
    # zeroed fractions and what ran (backend, format, rounding, RHT) into metrics.jsonl; 0: off
    quant_stats_interval: int = 0
    peak_tflops: float | None = None  # MFU denominator per process; null: a matmul measured at start-up


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
    timeout_s: float = 600.0  # a rank that dies or hangs makes the others exit after this


@dataclass
class GemmConfig:
    # a registered FP4 GEMM backend: emulated | fused (torch.compile'd) | triton (Triton kernels, CUDA), all
    # with the same bits | triton_bf16 (the same kernels, bf16 operands: faster, not bitwise; docs/backends.md)
    backend: str = "emulated"


@dataclass
class RunConfig:
    model: ModelConfig
    recipe: dict = field(default_factory=lambda: {"name": "ufp4"})  # Recipe.from_dict input
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    gemm: GemmConfig = field(default_factory=GemmConfig)

    def build_recipe(self) -> tuple[Recipe, str]:
        """The recipe (the base one under a ``recipe.schedule``) and the GEMM backend name it runs on."""
        return Recipe.from_dict(base_recipe_config(dict(self.recipe))), self.gemm.backend

    def sr_base_seed(self) -> int:
        """The base of every module's stochastic-rounding seed: ``training.sr_seed``, else ``training.seed``."""
        t = self.training
        return t.sr_seed if t.sr_seed is not None else t.seed

    def build_schedule(self) -> PrecisionSchedule:
        """The precision phases of ``recipe.schedule`` (one phase, the recipe, without it)."""
        return PrecisionSchedule.from_config(dict(self.recipe), self.training.train_steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        try:
            self.model.validate()
        except ValueError as e:
            raise ConfigError(_model_message(str(e))) from None
        if "backend" in self.recipe:
            b = self.recipe["backend"]
            raise ConfigError(f"recipe.backend: moved to gemm.backend (YAML: gemm: {{backend: {b}}}; "
                              f"command line: gemm.backend={b})")
        try:
            self.build_recipe()
            self.build_schedule()
        except ValueError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("recipe") else f"recipe: {msg}") from None
        for key, v in _float_fields(self):  # every float: finite, and inside its meaningful range
            desc, ok = _FLOAT_RULES.get(key, ("", None))
            if not math.isfinite(v) or (ok is not None and not ok(v)):
                raise ConfigError(f"{key}: must be finite{' and ' + desc if desc else ''} (got {v!r})")
        t, p = self.training, self.parallel
        ints = [  # (key, value, ok, what it must be)
            ("training.seed", t.seed, 0 <= t.seed < 2 ** 32, "in [0, 2^32) (numpy's seed range)"),
            ("training.train_steps", t.train_steps, t.train_steps >= 1, ">= 1"),
            ("training.micro_batch_size", t.micro_batch_size, t.micro_batch_size >= 1, ">= 1"),
            ("training.global_batch_size", t.global_batch_size, t.global_batch_size >= 1, ">= 1"),
            ("training.eval_interval", t.eval_interval, t.eval_interval >= 0, ">= 0 (0: no evaluation)"),
            ("training.eval_windows", t.eval_windows, t.eval_windows is None or t.eval_windows >= 1,
             "null or >= 1"),
            ("training.sr_seed", t.sr_seed, t.sr_seed is None or 0 <= t.sr_seed < 2 ** 63, "null or in [0, 2^63)"),
            ("training.cpu_threads", t.cpu_threads, t.cpu_threads >= 0, ">= 0 (0: automatic)"),
            ("training.eval_iters", t.eval_iters, t.eval_iters >= (1 if t.eval_interval > 0 else 0),
             ">= 1 when training.eval_interval > 0" if t.eval_interval > 0 else ">= 0"),
            ("training.max_consecutive_nonfinite", t.max_consecutive_nonfinite, t.max_consecutive_nonfinite >= 1,
             ">= 1"),
            ("training.recompute_num_layers", t.recompute_num_layers,
             t.recompute_num_layers >= 1 and (t.recompute_granularity != "full" or t.recompute_method == "block"
                                              or t.recompute_num_layers == 1),
             ">= 1, and 1 with full recompute_method=uniform (every layer recomputes on its own; groups of "
             "layers are not supported)"),
            ("schedule.warmup_steps", self.schedule.warmup_steps, self.schedule.warmup_steps >= 0, ">= 0"),
            ("data.seq_len", self.data.seq_len, self.data.seq_len >= 1, ">= 1"),
            ("data.seq_len", self.data.seq_len, self.data.seq_len <= self.model.max_seq_len,
             f"<= model.max_seq_len={self.model.max_seq_len}"),
            ("checkpoint.interval", self.checkpoint.interval, self.checkpoint.interval >= 0,
             ">= 0 (0: only the final checkpoint)"),
            ("checkpoint.keep_last", self.checkpoint.keep_last, self.checkpoint.keep_last >= 1, ">= 1"),
            ("logging.interval", self.logging.interval, self.logging.interval >= 1, ">= 1"),
            ("logging.quant_stats_interval", self.logging.quant_stats_interval, self.logging.quant_stats_interval >= 0,
             ">= 0 (0: off)"),
            *((f"parallel.{k}", getattr(p, k), getattr(p, k) >= 1, ">= 1")
              for k in ("tensor", "pipeline", "expert", "virtual_pipeline")),
            ("parallel.data", p.data, p.data >= 0, ">= 0 (0: the rest of the world)"),
            *((f"parallel.{k}", getattr(p, k), getattr(p, k) is None or getattr(p, k) >= 0, "null or >= 0")
              for k in ("first_stage_layers", "last_stage_layers")),
        ]
        for key, v, ok, what in ints:
            if not ok:
                raise ConfigError(f"{key}: must be {what} (got {v!r})")
        if t.global_batch_size % (t.micro_batch_size * max(1, p.data)):
            raise ConfigError(f"training.global_batch_size: must be a multiple of training.micro_batch_size x "
                              f"parallel.data = {t.micro_batch_size} x {max(1, p.data)} "
                              f"(got {t.global_batch_size})")
        choices = [
            ("training.dtype", t.dtype, ("fp32", "bf16")),
            ("training.recompute_granularity", t.recompute_granularity, ("none", "selective", "full")),
            ("training.recompute_method", t.recompute_method, ("uniform", "block")),
            ("schedule.kind", self.schedule.kind, ("cosine", "wsd", "constant")),
            ("logging.wandb_mode", self.logging.wandb_mode, ("offline", "online", "disabled")),
            ("parallel.pipeline_schedule", p.pipeline_schedule, ("1f1b", "interleaved_1f1b", "gpipe")),
            ("parallel.expert_dispatcher", p.expert_dispatcher, ("alltoall", "allgather")),
            ("gemm.backend", self.gemm.backend, tuple(available_backends())),
        ]
        for key, v, allowed in choices:
            if v not in allowed:
                raise ConfigError(f"{key}: must be one of {', '.join(allowed)} (got {v!r})")
        if not (t.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", str(t.device))):
            raise ConfigError(f"training.device: must be auto, cpu, cuda or cuda:N (got {t.device!r})")
        self.data.corpora()  # a malformed data.path / valid_path / test_path / split is one line here
        for key, v in (("data.prefix", self.data.prefix), ("training.run_dir", t.run_dir),
                       ("training.resume", t.resume), ("training.init_from", t.init_from or "-")):
            if not v.strip():
                raise ConfigError(f"{key}: must not be empty (got {v!r})")
        return self


# (section.key) -> (the range in words, the check); any other float field only has to be finite.
# model.* floats are checked by ModelConfig.validate (its messages are rewritten by _model_message).
_FLOAT_RULES = {
    "optimizer.lr": ("> 0", lambda v: v > 0),
    "optimizer.weight_decay": (">= 0", lambda v: v >= 0),
    "optimizer.beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optimizer.beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optimizer.eps": ("> 0", lambda v: v > 0),
    "optimizer.grad_clip": (">= 0 (0: no clipping)", lambda v: v >= 0),
    "schedule.min_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "schedule.decay_fraction": ("in (0, 1]", lambda v: 0 < v <= 1),
    "parallel.timeout_s": ("> 0", lambda v: v > 0),
    "logging.peak_tflops": ("> 0", lambda v: v > 0),
}


def _float_fields(cfg: RunConfig):
    """(section.key, value) of every float-typed field set to a number, in every section."""
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        if not dataclasses.is_dataclass(obj):
            continue
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            tp = hints[f.name]
            if tp is float or float in typing.get_args(tp):
                v = getattr(obj, f.name)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    yield f"{sec.name}.{f.name}", v


def _model_message(msg: str) -> str:
    """``ModelConfig.num_heads must ...`` -> ``model.num_heads: must ...`` (the key as written in YAML)."""
    m = re.match(r"ModelConfig\.(\w+) (.*)", msg)
    return f"model.{m.group(1)}: {m.group(2)}" if m else f"model: {msg}"


def _unknown(kind: str, name, known, where: str = "", section: str = "") -> ConfigError:
    """One line: the unknown name (``section.name``), where it came from, the known names, the closest."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    shown = f"{section}.{name}" if section else str(name)
    return ConfigError(f"unknown {kind} {shown!r}{where} (known: {', '.join(known)}{hint})")


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
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((k for k in d if k not in names), key=str)
    if unknown:
        if not prefix:
            raise _unknown("section", unknown[0], names)
        raise _unknown("config key", unknown[0], names, section=prefix)
    kwargs = {k: _check_type(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def merge_into(dst: dict, src: dict, where: str = "") -> dict:
    """``src`` merged into ``dst`` key by key, recursively: a nested mapping never replaces a
    whole section; a mapping onto a value that is not one (or the reverse) is refused."""
    for k, v in src.items():
        here = f"{where}.{k}" if where else str(k)
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            dst[k] = merge_into(dict(dst[k]), v, here)
        elif isinstance(v, dict) and k in dst and dst[k] is not None:
            raise ConfigError(f"{here}: a mapping cannot replace the value {dst[k]!r}")
        else:
            dst[k] = v
    return dst


def apply_override(d: dict, override: str) -> None:
    """``a.b.c=value`` (value parsed as YAML: 3e-4, true, [1, 2], null); a mapping value merges
    into the section key by key (``training={seed: 7}`` is ``training.seed=7``)."""
    key, sep, raw = override.partition("=")
    if not sep or any(not part.strip() for part in key.split(".")):  # no '=', or an empty name: '=5', 'a..b=1'
        raise ConfigError(f"override {override!r}: expected section.key=value")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        reason = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise ConfigError(f"override {key}: cannot parse value {raw!r}{reason}") from None
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    merge_into(node, {parts[-1]: value}, ".".join(parts[:-1]))


SECTIONS = [f.name for f in dataclasses.fields(RunConfig)]


def config_from_dict(d: dict) -> RunConfig:
    for name in sorted(d, key=str):  # before "no model section": a misspelled 'model' is the likely cause
        if name not in SECTIONS:
            raise _unknown("section", name, SECTIONS)
    if "model" not in d:
        raise ConfigError("config has no model section")
    if isinstance(d["model"], dict) and "preset" in d["model"]:
        try:
            d = {**d, "model": with_preset(d["model"])}
        except ValueError as e:
            raise ConfigError(_model_message(str(e))) from None
    return _build(RunConfig, d, "").validate()


def upgrade_saved_config(d) -> dict:
    """A config saved with an older checkpoint, in today's layout: ``recipe.backend`` moves
    to ``gemm.backend`` (``emulated`` when neither is set, the default then and now),
    ``parallel.zero1`` goes (it changed nothing: the only trainer that read it refused
    false) and model fields added since get their defaults.  Anything that is not a mapping
    becomes ``{}``; other sections are copied."""
    if not isinstance(d, dict):
        return {}
    d = dict(d)
    recipe = d.get("recipe")
    if isinstance(recipe, dict) and "backend" in recipe:
        recipe = dict(recipe)
        backend = recipe.pop("backend")
        d["recipe"] = recipe
        d.setdefault("gemm", {"backend": backend})
    d.setdefault("gemm", dataclasses.asdict(GemmConfig()))
    if isinstance(d.get("parallel"), dict):
        d["parallel"] = {k: v for k, v in d["parallel"].items() if k != "zero1"}
    if isinstance(d.get("model"), dict) and "preset" not in d["model"]:
        d["model"] = upgrade_saved_model(d["model"])  # fields added since: their defaults
    return d


def config_from_saved(d) -> RunConfig:
    """``config_from_dict`` of a checkpoint's saved config, of this or an older layout."""
    return config_from_dict(upgrade_saved_config(d))


def read_yaml_mapping(p: Path, what: str = "config", top: str = "a mapping of sections") -> dict:
    """A YAML file's top-level mapping (``safe_load``: no code runs); one-line ConfigErrors."""
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        loaded = yaml_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        raise ConfigError(f"{p}: {e.problem}" + (f" (line {mark.line + 1})" if mark else "")) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be {top}")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    d: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        loaded = read_yaml_mapping(p)
        for name in sorted(loaded, key=str):
            if name not in SECTIONS:
                raise _unknown("section", name, SECTIONS, f" in {p}")
        merge_into(d, loaded)
    for o in overrides:
        apply_override(d, o)
        section = o.partition("=")[0].split(".")[0]
        if section not in SECTIONS:
            raise _unknown("section", section, SECTIONS, f" in override {o!r}")
    return config_from_dict(d)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
