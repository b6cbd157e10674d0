"""Precision schedules (``recipe.schedule``): which recipe each optimizer step runs.

    recipe:
      name: ufp4
      schedule:
        - {from_fraction: 0.9, fprop: {x: {format: bf16}, w: {format: bf16}}}   # Fprop in high precision
        - {from_step: 190, name: bf16}                                            # then every GEMM

Phase 0 is the base recipe (the mapping without ``schedule``) from step 0.  Every entry is a
phase: one start (``from_step: N`` or ``from_fraction: f`` of ``training.train_steps``) and
recipe keys, merged onto the base recipe's keys as a recipe mapping's keys are merged onto its
preset; an entry that names a preset (``name:``) starts from that preset instead.

Steps are counted as the training loop counts them: step s is the optimizer step that runs
after s steps are done (the first step after resuming from checkpoint ``step_s``; its
metrics record says ``"step": s + 1``).  ``from_fraction: f`` starts at step
``floor(f * train_steps + 1/2)`` (the nearest step, halves up).  Every micro-batch of step s
runs the phase with the largest start <= s; starts must increase strictly, the first > 0.

A phase changes how GEMMs quantize, nothing else: each module keeps its SR seed and its one
set of RHT signs, so a phase that rotates must use the base recipe's rht_size and rht_seed.

Specification: docs/recipes.md ("Precision schedules").
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

from .recipes import _TOP_KEYS, GEMM_ROLES, Recipe, _flatten, _merge, _short

START_KEYS = ("from_step", "from_fraction")


@dataclass(frozen=True)
class Phase:
    start: int  # the first step (0-based, as the loop counts) that runs this phase
    recipe: Recipe
    where: str  # the config key it came from ("recipe" for the base, "recipe.schedule[i]")
    written: dict  # the entry as written (start key included); {} for the base

    @property
    def changes(self) -> str:
        """The entry's recipe keys, flattened: ``name=bf16`` or ``fprop.x.format=bf16, ...``."""
        keys = {k: v for k, v in self.written.items() if k not in START_KEYS}
        return ", ".join(f"{k}={_short(v)}" for k, v in _flatten(keys).items()) or "(no change)"


def base_recipe_config(d):
    """The recipe mapping without its ``schedule`` (what ``Recipe.from_dict`` takes)."""
    return {k: v for k, v in d.items() if k != "schedule"} if isinstance(d, dict) else d


def _uses_rht(r: Recipe) -> bool:
    return any(r.gemm(g).rht for g in GEMM_ROLES)


def _start(entry: dict, where: str, train_steps: int) -> int:
    given = [k for k in START_KEYS if k in entry]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of from_step and from_fraction (got "
                         f"{' and '.join(given) or 'neither'})")
    v = entry[given[0]]
    if given[0] == "from_step":
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}.from_step: must be an integer >= 0 (got {v!r})")
        return v
    # written as "inside the range" so that NaN is refused too
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ValueError(f"{where}.from_fraction: must be a number in [0, 1] (got {v!r})")
    return math.floor(v * train_steps + 0.5)


def _phase_recipe(base: Recipe, entry: dict, where: str) -> Recipe:
    keys = {k: v for k, v in entry.items() if k not in START_KEYS}
    unknown = sorted(set(keys) - _TOP_KEYS, key=str)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown recipe key (a phase takes from_step or from_fraction "
                         f"and recipe keys: {', '.join(sorted(_TOP_KEYS))})")
    spec = copy.deepcopy(keys) if "name" in keys else _merge(base.to_dict(), keys)
    try:
        return Recipe.from_dict(spec)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class PrecisionSchedule:
    """The phases of one run, phase 0 the base recipe at step 0; one phase: no schedule."""
    phases: tuple[Phase, ...]

    @classmethod
    def from_config(cls, d: dict | str | None, train_steps: int) -> "PrecisionSchedule":
        """From a recipe mapping (its ``schedule`` key, if any) and ``training.train_steps``;
        a ValueError names the key, e.g. ``recipe.schedule[1].from_step: ...``."""
        base = Recipe.from_dict(base_recipe_config(d))
        phases = [Phase(0, base, "recipe", {})]
        entries = d.get("schedule") if isinstance(d, dict) else None
        if entries is None:
            entries = []
        if not isinstance(entries, (list, tuple)):
            raise ValueError(f"recipe.schedule: must be a list of phases (got {entries!r})")
        for i, entry in enumerate(entries):
            where = f"recipe.schedule[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: a phase must be a mapping of from_step or from_fraction and recipe "
                                 f"keys (got {entry!r})")
            start = _start(entry, where, train_steps)
            prev = phases[-1]
            if start <= prev.start:
                key = next(k for k in START_KEYS if k in entry)
                after = "the base recipe" if prev.where == "recipe" else prev.where
                raise ValueError(f"{where}.{key}: starts at step {start}, not after {after}, which starts at "
                                 f"step {prev.start}; phases must start in strictly increasing order")
            recipe = _phase_recipe(base, entry, where)
            if _uses_rht(recipe) and (recipe.rht_size, recipe.rht_seed) != (base.rht_size, base.rht_seed):
                key = "rht_size" if recipe.rht_size != base.rht_size else "rht_seed"
                raise ValueError(f"{where}.{key}: a phase that rotates must keep the base recipe's Hadamard "
                                 f"(rht_size {base.rht_size}, rht_seed {base.rht_seed}): every module has one "
                                 f"set of RHT signs (got rht_size {recipe.rht_size}, rht_seed {recipe.rht_seed})")
            phases.append(Phase(start, recipe, where, copy.deepcopy(entry)))
        return cls(tuple(phases))

    @classmethod
    def single(cls, recipe: Recipe) -> "PrecisionSchedule":
        return cls((Phase(0, recipe, "recipe", {}),))

    # -- queries ----------------------------------------------------------------------------
    @property
    def base(self) -> Recipe:
        return self.phases[0].recipe

    @property
    def recipes(self) -> tuple[Recipe, ...]:
        return tuple(p.recipe for p in self.phases)

    @property
    def scheduled(self) -> bool:
        return len(self.phases) > 1

    def __len__(self) -> int:
        return len(self.phases)

    def phase_at(self, step: int) -> int:
        """The index of the phase step ``step`` runs: the one with the largest start <= step."""
        return max(i for i, p in enumerate(self.phases) if p.start <= step)

    def label(self, recipe_label: Callable[[Recipe], str] = Recipe.label) -> str:
        """The base label, then every phase as ``>label@start``: ``ufp4>bf16@180``; two
        schedules get one label only when their phases start at the same steps with the same recipes."""
        return ">".join([recipe_label(self.base)] + [f"{recipe_label(p.recipe)}@{p.start}" for p in self.phases[1:]])

    def table(self, train_steps: int | None = None) -> str:
        """One line per phase: where it starts, what its entry changes, what it then runs."""
        lines = [f"precision schedule: {len(self.phases)} phases"]
        for i, p in enumerate(self.phases):
            if i == 0:
                lines.append(f"phase 0 from step 0: {p.recipe.label()} (the base recipe)")
                continue
            never = " (after the last step: never runs)" if train_steps is not None and p.start >= train_steps else ""
            lines.append(f"phase {i} from step {p.start}{never} ({p.where}): {p.changes} -> {p.recipe.label()}")
        return "\n".join(lines)

    def to_list(self) -> list[dict]:
        """Per phase: start, label, where and the entry as written (run_info.json)."""
        return [{"phase": i, "from_step": p.start, "label": p.recipe.label(), "where": p.where,
                 "entry": copy.deepcopy(p.written)} for i, p in enumerate(self.phases)]


__all__ = ["Phase", "PrecisionSchedule", "START_KEYS", "base_recipe_config"]
