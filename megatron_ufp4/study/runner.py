"""Run a study's grid: every run an ordinary ``megatron_ufp4.train`` process, then one
``megatron_ufp4.eval`` on the fixed validation windows.

A run whose final checkpoint and evaluation exist is skipped; an interrupted one resumes
(``training.resume=auto``); a failed one is reported with its log and the others go on.
Runs go ``jobs`` at a time, the usable cores split between them (``OMP_NUM_THREADS``), or
each under the study's ``launcher`` (e.g. torchrun).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..training.checkpoint import STEP_DIR, latest_checkpoint
from ..training.run_setup import usable_cores
from ..outputs import write_text
from .spec import RunSpec, Study, StudyError

EVAL_FILE = "study_eval.json"


@dataclass
class RunStatus:
    run: RunSpec
    state: str  # done | partial | new | stale (trained with another config than the study asks now)
    step: int
    train_steps: int
    stale: tuple[str, ...] = ()  # what differs: "key: checkpoint has X, config has Y"


# what a run's results depend on: every key of these sections but the training keys below
RESULT_SECTIONS = ("model", "recipe", "gemm", "data", "optimizer", "schedule", "training")
NOT_RESULTS = {"training.run_dir", "training.resume", "training.overwrite", "training.device", "training.cpu_threads",
               "training.eval_interval", "training.eval_iters", "training.eval_windows",
               "training.max_consecutive_nonfinite"}


def checkpoint_step(path: Path | None) -> int:
    return int(STEP_DIR.match(path.name).group(1)) if path is not None else 0


def read_eval(run: RunSpec) -> dict | None:
    """The run's evaluation, or None if missing or damaged (then it is evaluated again)."""
    try:
        ev = json.loads((run.run_dir / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    ok = isinstance(ev, dict) and all(isinstance(ev.get(k), (int, float)) for k in ("loss", "se", "step"))
    return ev if ok else None


def stale_keys(study: Study, run: RunSpec) -> tuple[str, ...]:
    """How the run's latest checkpoint was configured differently from what the study asks now
    in anything its results depend on (empty: the same run, or nothing trained yet)."""
    from ..yaml_files import yaml_load
    from ..training.checkpoint import config_differences

    ckpt = latest_checkpoint(run.run_dir)
    if ckpt is None:
        return ()
    path = ckpt / "config.yaml" if ckpt.is_dir() else ckpt.with_name("config.yaml")
    try:
        saved = yaml_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:  # missing, not UTF-8, damaged
        return (f"its checkpoint's config {path} cannot be read ({type(e).__name__})",)
    diffs = config_differences(saved, study.run_config(run).to_dict(), RESULT_SECTIONS)
    return tuple(d for d in diffs if d.split(":", 1)[0] not in NOT_RESULTS)


def status(study: Study, run: RunSpec) -> RunStatus:
    steps = study.run_config(run).training.train_steps
    step = checkpoint_step(latest_checkpoint(run.run_dir))
    stale = stale_keys(study, run)
    if stale:
        return RunStatus(run, "stale", step, steps, stale)
    ev = read_eval(run)
    evaluated = ev is not None and ev.get("step") == steps and ev.get("requested_windows") == study.eval_windows
    state = "done" if step >= steps and evaluated else ("partial" if step or run.run_dir.exists() else "new")
    return RunStatus(run, state, step, steps)


def _nproc(launcher: list[str]) -> int:
    """Processes per node the launcher starts (torchrun's --nproc-per-node/--nproc_per_node)."""
    for i, a in enumerate(launcher):
        for flag in ("--nproc-per-node", "--nproc_per_node"):
            if a == flag and i + 1 < len(launcher) and launcher[i + 1].isdigit():
                return int(launcher[i + 1])
            if a.startswith(flag + "=") and a.split("=", 1)[1].isdigit():
                return int(a.split("=", 1)[1])
    return 1


class StudyRunner:
    """``rerun_stale``: a run trained with another config than the study asks now is trained
    again from scratch (its old directory moved aside by the trainer, never deleted);
    otherwise the study is refused with the differing keys."""

    def __init__(self, study: Study, jobs: int | None = None, console=print, python: str = sys.executable,
                 rerun_stale: bool = False):
        self.study, self.console, self.python = study, console, python
        self.jobs = jobs or study.jobs
        self.rerun_stale = rerun_stale
        procs = self.jobs * _nproc(study.launcher)
        self.threads = max(1, usable_cores() // procs)
        self.log_dir = study.out_dir / "logs"
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen] = set()
        self._stopping = False

    def _env(self) -> dict:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(self.threads)  # configure_threads respects it
        return env

    def _call(self, cmd: list[str], log: Path) -> int:
        with log.open("a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            with self._lock:
                if self._stopping:
                    return -signal.SIGTERM
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self._env())
                self._children.add(proc)
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._children.discard(proc)

    def stop(self) -> None:
        """Ask every running child to stop (SIGTERM: a training saves a checkpoint and exits);
        no new one starts."""
        with self._lock:
            self._stopping = True
            for proc in self._children:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    def train_command(self, run: RunSpec, fresh: bool = False) -> list[str]:
        head = [*self.study.launcher, "-m"] if self.study.launcher else [self.python, "-m"]
        start = ["training.resume=none", "training.overwrite=true"] if fresh else ["training.resume=auto"]
        return [*head, "megatron_ufp4.train", str(self.study.base), *run.overrides, *start]

    def eval_command(self, run: RunSpec, checkpoint: Path) -> list[str]:
        s = self.study
        cmd = [self.python, "-m", "megatron_ufp4.eval", str(checkpoint), "--windows", str(s.eval_windows),
               "--json", str(run.run_dir / EVAL_FILE), "--overwrite", "--threads", str(self.threads)]
        if s.eval_batch_size:
            cmd += ["--batch-size", str(s.eval_batch_size)]
        if s.eval_backend:
            cmd += ["--backend", s.eval_backend]
        return cmd

    def run_one(self, st: RunStatus) -> str | None:
        """Train (or resume) and evaluate one run; None, or the reason it failed."""
        run = st.run
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / (run.key.replace("/", "__") + ".log")
        if st.state == "stale" or st.step < st.train_steps:
            with self._lock:
                self.console(f"  train {run.key}" + (" (again: its config changed)" if st.state == "stale" else
                                                     f" (resuming at step {st.step})" if st.step else ""))
            rc = self._call(self.train_command(run, fresh=st.state == "stale"), log)
            if rc != 0:
                return f"training exited with {rc} (log: {log})"
        ckpt = latest_checkpoint(run.run_dir)
        if checkpoint_step(ckpt) < st.train_steps:
            return f"no final checkpoint in {run.run_dir} (log: {log})"
        rc = self._call(self.eval_command(run, ckpt), log)
        if rc != 0:
            return f"evaluation exited with {rc} (log: {log})"
        ev = read_eval(run)  # the requested count is kept beside the count evaluated (the split may be shorter)
        if ev is None:
            return f"evaluation wrote no readable {EVAL_FILE} (log: {log})"
        ev["requested_windows"] = self.study.eval_windows
        write_text(run.run_dir / EVAL_FILE, json.dumps(ev) + "\n")
        with self._lock:
            self.console(f"  done  {run.key}: validation loss {ev['loss']:.4f} ± {ev['se']:.4f}")
        return None

    def probe_path(self, point: str | None, seed: int) -> Path:
        return self.study.out_dir / "probes" / (point or "") / f"seed_{seed}.json"

    def run_probes(self) -> dict[str, str]:
        """The study's fidelity probes on each seed's final checkpoint of ``probes.arm`` (in
        this process, after the trainings); a probe already done with the same settings is kept."""
        from ..training.run_setup import configure_threads
        from .probes import run_probes

        p, failures = self.study.probes, {}
        configure_threads(0)
        for run in (r for r in self.study.runs() if r.arm == p["arm"]):
            out = self.probe_path(run.point, run.seed)
            try:
                done = json.loads(out.read_text(encoding="utf-8"))
                if isinstance(done, dict) and done.get("settings") == p:
                    continue
            except (OSError, ValueError):
                pass
            st = status(self.study, run)
            if st.state != "done":
                failures[f"probes {run.key}"] = "its training did not finish"
                continue
            ckpt = latest_checkpoint(run.run_dir)
            self.console(f"  probes on {run.key} ({len(p['recipes'])} recipes, {p['batches']} x {p['batch_size']} "
                         "windows)")
            res = run_probes(ckpt, p["recipes"], p["batches"], p["batch_size"], console=self.console)
            res["settings"] = p
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text(out, json.dumps(res) + "\n")
        return failures

    def todo(self) -> list[RunStatus]:
        """The runs not done yet; ``StudyError`` if some were trained with another config than the
        study asks now and ``rerun_stale`` is off (read only: also a check before anything runs)."""
        todo = [st for st in (status(self.study, r) for r in self.study.runs()) if st.state != "done"]
        stale = [st for st in todo if st.state == "stale"]
        if stale and not self.rerun_stale:
            first = stale[0]
            more = f" (+{len(first.stale) - 1} more)" if len(first.stale) > 1 else ""
            raise StudyError(f"{len(stale)} run(s) in {self.study.out_dir} were trained with another config than "
                             f"the study asks now, e.g. {first.run.key}: {first.stale[0]}{more}; pass "
                             "--rerun-stale to train them again (old directories are moved aside) or use --out")
        return todo

    def run(self) -> dict[str, str]:
        """Every run not yet done, then the probes; returns {run key: why it failed}.  Refused
        (``StudyError``) when a finished or started run was trained with another config."""
        todo = self.todo()
        total = len(self.study.runs())
        self.console(f"study {self.study.name}: {total} runs, {total - len(todo)} done, {len(todo)} to go "
                     f"({self.jobs} at a time, {self.threads} thread(s) each); output {self.study.out_dir}")
        failures = {}
        ex = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            futures = {ex.submit(self.run_one, st): st.run.key for st in todo}
            for f in as_completed(futures):
                why = f.result()
                if why:
                    failures[futures[f]] = why
                    self.console(f"  FAILED {futures[f]}: {why}")
        except BaseException:  # Ctrl-C / SIGTERM: queued runs never start, running ones save and exit
            self.stop()
            raise
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
        if self.study.probes:
            failures.update(self.run_probes())
        return failures
