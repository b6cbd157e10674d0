"""A study file: a base config, arms, seeds and an optional sweep, as YAML (``safe_load``).

    name: recipes                      # the study's name (report titles)
    base: ../tiny_dense.yaml           # the run config every run starts from (relative to this file)
    overrides: {training.train_steps: 300}   # applied to every run
    arms:                              # arm name -> overrides
      bf16: {recipe.name: bf16}
      ufp4: {recipe.name: ufp4}
    reference: bf16                    # gaps are relative to this arm (default: an arm named bf16/fp32)
    pairs: [[e2m1_ref, ufp4]]          # paired differences A - B of the gaps, per seed
    seeds: [1, 2, 3]                   # training.seed: initialisation and data order, shared by the arms
    sweep:                             # optional: the study repeated at each point
      kind: size                       # size (x = non-embedding parameters) | tokens (x = training tokens)
      points: {s: {model.hidden_size: 64}, m: {model.hidden_size: 128}}
    eval: {windows: 256, batch_size: 8, backend: null}   # the fixed validation windows every run is scored on
    final_window: 50                   # steps of the training-loss average (the paper's gap definition)
    out_dir: runs/studies/recipes      # relative to the working directory
    jobs: 1                            # runs at a time (threads are split between them)
    launcher: null                     # [torchrun, --nproc-per-node, 2] for every run (torchrun and its
                                       # rendezvous options only: a study file runs no other program)
    probes:                            # optional fidelity probes on each seed's final checkpoint of one arm
      arm: bf16
      recipes: [ufp4, e2m1_ref]        # preset names, or name -> recipe mapping
      batches: 4                       # validation batches of batch_size windows
      batch_size: 8

Every (sweep point, arm, seed) is an ordinary run directory
``<out_dir>/runs/[<point>/]<arm>/seed_<seed>``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError, RunConfig, load_config, read_yaml_mapping


class StudyError(ValueError):
    """A user error in a study file (one line, naming the file and the field)."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_KEYS = ("name", "base", "overrides", "arms", "reference", "pairs", "seeds", "sweep", "eval", "final_window",
         "out_dir", "jobs", "launcher", "probes")


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its place in the grid, its overrides and its directory."""
    point: str | None
    arm: str
    seed: int
    overrides: tuple[str, ...]
    run_dir: Path

    @property
    def key(self) -> str:
        return "/".join(p for p in (self.point, self.arm, f"seed_{self.seed}") if p)


@dataclass
class Study:
    path: Path
    name: str
    base: Path
    arms: dict[str, dict]
    seeds: list[int]
    out_dir: Path
    overrides: dict = field(default_factory=dict)
    reference: str | None = None
    pairs: list[tuple[str, str]] = field(default_factory=list)
    sweep_kind: str | None = None
    points: dict[str, dict] = field(default_factory=dict)
    eval_windows: int = 256
    eval_batch_size: int | None = None
    eval_backend: str | None = None
    final_window: int = 50
    jobs: int = 1
    launcher: list[str] = field(default_factory=list)
    probes: dict | None = None  # {"arm", "recipes": {name: recipe mapping}, "batches", "batch_size"}

    def runs(self) -> list[RunSpec]:
        out = []
        for point in (self.points or {None: {}}):
            for arm, arm_over in self.arms.items():
                for seed in self.seeds:
                    d = self.out_dir / "runs" / (point or "") / arm / f"seed_{seed}"
                    merged = {**self.overrides, **(self.points.get(point, {}) if point else {}), **arm_over,
                              "training.seed": seed, "training.run_dir": str(d)}
                    out.append(RunSpec(point, arm, seed, tuple(to_override(k, v) for k, v in merged.items()), d))
        return out

    def run_config(self, run: RunSpec) -> RunConfig:
        try:
            return load_config(self.base, list(run.overrides))
        except ConfigError as e:
            raise StudyError(f"{self.path}: run {run.key}: {e}") from None


def to_override(key: str, value) -> str:
    """``("recipe.rht", ["fprop"])`` -> ``"recipe.rht=[fprop]"`` (the value as YAML flow text)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    elif text.endswith("..."):
        text = text[:-3].strip()
    return f"{key}={text}"


def _mapping(v, where: str, path: Path) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise StudyError(f"{path}: {where}: expected a mapping of section.key: value (got {v!r})")
    return dict(v)


def _overrides(v, where: str, path: Path) -> dict:
    """An overrides mapping as dotted keys: ``{training: {seed: 7}}`` is ``{training.seed: 7}``
    (a nested mapping sets keys of a section, never replaces it, and the study's own keys
    are found however they are written)."""
    flat: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, x in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(x, dict) and x:
                walk(x, key)
            elif key in flat:
                raise StudyError(f"{path}: {where}: {key} is given twice")
            else:
                flat[key] = x

    walk(_mapping(v, where, path), "")
    return flat


# torchrun options a study's launcher may carry (the launcher is never a shell or another program:
# a shared study file must not run arbitrary commands)
LAUNCHER_OPTIONS = ("--nproc-per-node", "--nproc_per_node", "--nnodes", "--node-rank", "--node_rank",
                    "--master-addr", "--master_addr", "--master-port", "--master_port", "--rdzv-backend",
                    "--rdzv_backend", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-id", "--rdzv_id", "--standalone",
                    "--max-restarts", "--max_restarts", "--monitor-interval", "--monitor_interval")


def _launcher(v, path: Path) -> list[str]:
    """``[torchrun, option, value, ...]`` with options from ``LAUNCHER_OPTIONS`` only."""
    launcher = v or []
    if isinstance(launcher, str):
        launcher = launcher.split()
    if not isinstance(launcher, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                 for x in launcher):
        raise StudyError(f"{path}: launcher: expected a command as a list (got {launcher!r})")
    launcher = [str(x) for x in launcher]
    if not launcher:
        return []
    if launcher[0] != "torchrun":
        raise StudyError(f"{path}: launcher: must start with torchrun (got {launcher[0]!r}); a study runs no "
                         "other program")
    for arg in launcher[1:]:
        if arg.startswith("-") and arg.split("=", 1)[0] not in LAUNCHER_OPTIONS:
            raise StudyError(f"{path}: launcher: torchrun option {arg!r} is not allowed "
                             f"(allowed: {', '.join(o for o in LAUNCHER_OPTIONS if '_' not in o)})")
    import shutil
    if shutil.which("torchrun") is None:
        raise StudyError(f"{path}: launcher: torchrun is not on the PATH (install torch in this environment)")
    return launcher


def _names(d: dict, where: str, path: Path) -> dict:
    for name in d:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise StudyError(f"{path}: {where}: {name!r} is not a usable name (letters, digits, _ . + -)")
    return d


def _positive_int(v, where: str, path: Path) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise StudyError(f"{path}: {where}: must be an integer >= 1 (got {v!r})")
    return v


def load_study(path: str | Path, out_dir: str | None = None, seeds=None) -> Study:
    """Read and check a study file; every run's config is resolved (and so validated) too.
    ``seeds`` (a count or a list) replaces the file's seeds."""
    path = Path(path)
    try:
        d = read_yaml_mapping(path, "study", "a mapping")
    except ConfigError as e:
        raise StudyError(str(e)) from None
    unknown = sorted(str(k) for k in d if k not in _KEYS)
    if unknown:
        raise StudyError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
    for key in ("base", "arms", "seeds"):
        if key not in d:
            raise StudyError(f"{path}: missing {key!r}")
    base = (path.parent / str(d["base"])).resolve()
    if not base.is_file():
        raise StudyError(f"{path}: base: config file not found: {base}")
    arms = _names(_mapping(d["arms"], "arms", path), "arms", path)
    if not arms:
        raise StudyError(f"{path}: arms: at least one arm is needed")
    arms = {a: _overrides(o, f"arms.{a}", path) for a, o in arms.items()}
    seeds = d["seeds"] if seeds is None else seeds
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(1, seeds + 1)) if seeds >= 1 else seeds  # "seeds: 3" means 1, 2, 3
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 32 for s in seeds):
        raise StudyError(f"{path}: seeds: expected a count or a list of integers in [0, 2^32) (got {seeds!r})")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: seeds: repeated seed in {seeds}")
    overrides = _overrides(d.get("overrides"), "overrides", path)
    if "reference" in d:  # written as null: no reference arm (no gaps)
        reference = d["reference"]
    else:
        reference = next((a for a in ("bf16", "fp32") if a in arms), None)
    if reference is not None and reference not in arms:
        raise StudyError(f"{path}: reference: {reference!r} is not an arm (arms: {', '.join(arms)})")
    pairs = d.get("pairs") or []
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise StudyError(f"{path}: pairs: expected a list of [arm_a, arm_b] (got {pairs!r})")
    for a, b in pairs:
        for x in (a, b):
            if x not in arms:
                raise StudyError(f"{path}: pairs: {x!r} is not an arm (arms: {', '.join(arms)})")
    sweep = _mapping(d.get("sweep"), "sweep", path)
    kind, points = None, {}
    if sweep:
        bad = sorted(set(sweep) - {"kind", "points"})
        if bad:
            raise StudyError(f"{path}: sweep: unknown key {bad[0]!r} (known: kind, points)")
        kind = sweep.get("kind", "size")
        if kind not in ("size", "tokens"):
            raise StudyError(f"{path}: sweep.kind: must be size or tokens (got {kind!r})")
        points = _names(_mapping(sweep.get("points"), "sweep.points", path), "sweep.points", path)
        if len(points) < 2:
            raise StudyError(f"{path}: sweep.points: a sweep needs at least two points")
        points = {p: _overrides(o, f"sweep.points.{p}", path) for p, o in points.items()}
    owned = ("training.seed", "training.run_dir", "training.resume", "training.overwrite")  # the study's, per run
    for where, over in [("overrides", overrides), *((f"arms.{a}", o) for a, o in arms.items()),
                        *((f"sweep.points.{p}", o) for p, o in points.items())]:
        for key in owned:
            if key in over:
                hint = {"training.seed": "use seeds", "training.run_dir": "use out_dir"}.get(key, "the study decides")
                raise StudyError(f"{path}: {where}: {key} is set by the study for every run ({hint})")
    ev = _mapping(d.get("eval"), "eval", path)
    bad = sorted(set(ev) - {"windows", "batch_size", "backend"})
    if bad:
        raise StudyError(f"{path}: eval: unknown key {bad[0]!r} (known: windows, batch_size, backend)")
    launcher = _launcher(d.get("launcher"), path)
    backend = ev.get("backend")
    if backend is not None:  # found now, not after every run has trained
        from ..linear.backends import available_backends
        if backend not in available_backends():
            raise StudyError(f"{path}: eval.backend: unknown backend {backend!r} "
                             f"(known: {', '.join(available_backends())})")
    out = Path(out_dir or d.get("out_dir") or f"runs/studies/{path.stem}")
    if out.exists() and not out.is_dir():
        raise StudyError(f"{path}: out_dir {out} exists and is not a directory")
    probes = _probes(d.get("probes"), arms, path)
    study = Study(
        path=path, name=str(d.get("name", path.stem)), base=base, arms=arms, seeds=seeds,
        out_dir=out, overrides=overrides, reference=reference,
        pairs=[tuple(p) for p in pairs], sweep_kind=kind, points=points,
        eval_windows=_positive_int(ev.get("windows", 256), "eval.windows", path),
        eval_batch_size=(_positive_int(ev["batch_size"], "eval.batch_size", path)
                         if ev.get("batch_size") is not None else None),
        eval_backend=backend,
        final_window=_positive_int(d.get("final_window", 50), "final_window", path),
        jobs=_positive_int(d.get("jobs", 1), "jobs", path), launcher=launcher, probes=probes)
    for run in study.runs():  # every run's config resolves: a typo stops the study before anything runs
        cfg = study.run_config(run)
        if study.final_window > cfg.training.train_steps:
            raise StudyError(f"{path}: final_window: {study.final_window} is more than run {run.key}'s "
                             f"training.train_steps={cfg.training.train_steps}")
    return study


def _probes(p, arms: dict, path: Path) -> dict | None:
    if p is None:
        return None
    p = _mapping(p, "probes", path)
    bad = sorted(set(p) - {"arm", "recipes", "batches", "batch_size"})
    if bad:
        raise StudyError(f"{path}: probes: unknown key {bad[0]!r} (known: arm, recipes, batches, batch_size)")
    arm = p.get("arm")
    if arm not in arms:
        raise StudyError(f"{path}: probes.arm: {arm!r} is not an arm (arms: {', '.join(arms)})")
    recipes = p.get("recipes")
    if isinstance(recipes, list):
        recipes = {str(r): {"name": r} for r in recipes}
    if not isinstance(recipes, dict) or not recipes:
        raise StudyError(f"{path}: probes.recipes: expected preset names or name -> recipe mappings (got {recipes!r})")
    from ..fp4.recipes import Recipe
    for name, spec in recipes.items():
        try:
            Recipe.from_dict(spec)
        except ValueError as e:
            raise StudyError(f"{path}: probes.recipes.{name}: {e}") from None
    return {"arm": arm, "recipes": recipes, "batches": _positive_int(p.get("batches", 4), "probes.batches", path),
            "batch_size": _positive_int(p.get("batch_size", 8), "probes.batch_size", path)}


def study_dict(study: Study) -> dict:
    d = dataclasses.asdict(study)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
