"""Run a study's grid: every run an ordinary ``megatron_ufp4.train`` process, then one
``megatron_ufp4.eval`` on the fixed validation windows.

A run whose final checkpoint and evaluation exist is skipped; an interrupted one resumes
(``training.resume=auto``); a failed one is reported with its log and the others go on.
Runs go ``jobs`` at a time, the usable cores split between them (``OMP_NUM_THREADS``), or
each under the study's ``launcher`` (e.g. torchrun).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..training.checkpoint import STEP_DIR, latest_checkpoint
from ..training.dist_checkpoint import is_distributed_checkpoint
from ..training.run_setup import usable_cores
from .spec import RunSpec, Study

EVAL_FILE = "study_eval.json"
REPO_TOOLS = Path(__file__).resolve().parents[2] / "tools"


@dataclass
class RunStatus:
    run: RunSpec
    state: str  # done | partial | new
    step: int
    train_steps: int


def checkpoint_step(path: Path | None) -> int:
    return int(STEP_DIR.match(path.name).group(1)) if path is not None else 0


def read_eval(run: RunSpec) -> dict | None:
    try:
        return json.loads((run.run_dir / EVAL_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def status(study: Study, run: RunSpec) -> RunStatus:
    steps = study.run_config(run).training.train_steps
    step = checkpoint_step(latest_checkpoint(run.run_dir))
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
    def __init__(self, study: Study, jobs: int | None = None, console=print, python: str = sys.executable):
        self.study, self.console, self.python = study, console, python
        self.jobs = jobs or study.jobs
        procs = self.jobs * _nproc(study.launcher)
        self.threads = max(1, usable_cores() // procs)
        self.log_dir = study.out_dir / "logs"
        self._lock = threading.Lock()

    def _env(self) -> dict:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(self.threads)  # configure_threads respects it
        return env

    def _call(self, cmd: list[str], log: Path) -> int:
        with log.open("a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self._env()).returncode

    def train_command(self, run: RunSpec) -> list[str]:
        head = [*self.study.launcher, "-m"] if self.study.launcher else [self.python, "-m"]
        return [*head, "megatron_ufp4.train", str(self.study.base), *run.overrides, "training.resume=auto"]

    def eval_command(self, run: RunSpec, checkpoint: Path) -> list[str]:
        s = self.study
        cmd = [self.python, "-m", "megatron_ufp4.eval", str(checkpoint), "--windows", str(s.eval_windows),
               "--json", str(run.run_dir / EVAL_FILE), "--threads", str(self.threads)]
        if s.eval_batch_size:
            cmd += ["--batch-size", str(s.eval_batch_size)]
        if s.eval_backend:
            cmd += ["--backend", s.eval_backend]
        return cmd

    def _single_file(self, run: RunSpec, checkpoint: Path, log: Path) -> Path | None:
        """A sharded (DCP) checkpoint as the one-file form the evaluator loads."""
        dst = self.study.out_dir / "consolidated" / run.key / checkpoint.name
        if (dst / "state.pt").is_file():
            return dst
        dst.mkdir(parents=True, exist_ok=True)
        tool = REPO_TOOLS / "convert_checkpoint.py"
        if not tool.is_file():
            with log.open("a") as f:
                f.write(f"error: {tool} not found (sharded checkpoints need the repository's tools/)\n")
            return None
        rc = self._call([self.python, str(tool), "to-single", str(checkpoint), str(dst / "state.pt")], log)
        return dst if rc == 0 else None

    def run_one(self, st: RunStatus) -> str | None:
        """Train (or resume) and evaluate one run; None, or the reason it failed."""
        run = st.run
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / (run.key.replace("/", "__") + ".log")
        if st.step < st.train_steps:
            with self._lock:
                self.console(f"  train {run.key}" + (f" (resuming at step {st.step})" if st.step else ""))
            rc = self._call(self.train_command(run), log)
            if rc != 0:
                return f"training exited with {rc} (log: {log})"
        ckpt = latest_checkpoint(run.run_dir)
        if checkpoint_step(ckpt) < st.train_steps:
            return f"no final checkpoint in {run.run_dir} (log: {log})"
        if is_distributed_checkpoint(ckpt):
            ckpt = self._single_file(run, ckpt, log)
            if ckpt is None:
                return f"could not consolidate the sharded checkpoint (log: {log})"
        rc = self._call(self.eval_command(run, ckpt), log)
        if rc != 0:
            return f"evaluation exited with {rc} (log: {log})"
        ev = read_eval(run)  # the requested count is kept beside the count evaluated (the split may be shorter)
        ev["requested_windows"] = self.study.eval_windows
        tmp = run.run_dir / (EVAL_FILE + ".tmp")
        tmp.write_text(json.dumps(ev) + "\n")
        os.replace(tmp, run.run_dir / EVAL_FILE)
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
                if json.loads(out.read_text()).get("settings") == p:
                    continue
            except (OSError, json.JSONDecodeError):
                pass
            st = status(self.study, run)
            if st.state != "done":
                failures[f"probes {run.key}"] = "its training did not finish"
                continue
            ckpt = latest_checkpoint(run.run_dir)
            log = self.log_dir / (run.key.replace("/", "__") + ".log")
            if is_distributed_checkpoint(ckpt):
                ckpt = self._single_file(run, ckpt, log)
                if ckpt is None:
                    failures[f"probes {run.key}"] = f"could not consolidate the sharded checkpoint (log: {log})"
                    continue
            self.console(f"  probes on {run.key} ({len(p['recipes'])} recipes, {p['batches']} x {p['batch_size']} "
                         "windows)")
            res = run_probes(ckpt, p["recipes"], p["batches"], p["batch_size"], console=self.console)
            res["settings"] = p
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(res) + "\n")
            os.replace(tmp, out)
        return failures

    def run(self) -> dict[str, str]:
        """Every run not yet done, then the probes; returns {run key: why it failed}."""
        todo = [st for st in (status(self.study, r) for r in self.study.runs()) if st.state != "done"]
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
        finally:
            ex.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: queued runs never start; running ones save
        if self.study.probes:
            failures.update(self.run_probes())
        return failures
