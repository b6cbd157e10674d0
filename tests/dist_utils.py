"""Run a function on N gloo ranks (separate processes) from a test, and collect results.

    results = run_ranks(4, my_fn, arg1, arg2)   # my_fn(rank, world_size, *args) -> picklable

The function must be importable (module level).  Each rank runs with one thread so four
ranks share two cores sanely; a rank that raises makes run_ranks raise with its traceback.

The ranks are a pool kept for the test session, one per world size: starting a process and
importing torch costs seconds, and the suite runs hundreds of rank functions.  Every call
runs in a fresh process group (destroyed afterwards, with every group made inside it) and
with the environment the rank started with; a call that fails or times out ends the pool,
so the next call starts new processes rather than ones a failed collective left waiting.

Rendezvous: the parent process owns a TCPStore bound to port 0 (the kernel picks a free
port and the store keeps it bound), and the ranks connect to it as clients.  Picking a
"free" port, closing it and letting rank 0 bind it later races with every other process
on the machine; a port held from the start cannot be taken.
"""
from __future__ import annotations

import atexit
import datetime
import os
import queue as queue_errors
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"


def _serve(rank, world_size, tasks, results):
    """A pool rank: run each task (port, fn, args, timeout) until told to stop (None)."""
    torch.set_num_threads(1)
    started_with = dict(os.environ)
    while True:
        task = tasks.get()
        if task is None:
            return
        port, fn, args, timeout = task
        os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_RANK=str(rank))
        try:
            td = datetime.timedelta(seconds=timeout)
            store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=td)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=td)
            out = fn(rank, world_size, *args)
            results.put((rank, "ok", out))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            os.environ.clear()
            os.environ.update(started_with)
            torch.set_num_threads(1)


class _RankPool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, self.tasks[r], self.results), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, args, timeout: float) -> list:
        store = dist.TCPStore(HOST, 0, self.world_size, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout))
        for q in self.tasks:
            q.put((store.port, fn, args, timeout))
        results, errors = [None] * self.world_size, []
        try:
            for _ in range(self.world_size):
                try:
                    rank, status, payload = self.results.get(timeout=timeout)
                except queue_errors.Empty:
                    errors.append(f"no result from every rank within {timeout:g} s")
                    break
                if status == "ok":
                    results[rank] = payload
                else:
                    errors.append(f"rank {rank}:\n{payload}")
                    break
        finally:
            if errors:
                self.close()  # ranks may wait in a collective a failed one never joins
            del store  # closes the port once every rank is done with it
        if errors:
            raise RuntimeError("\n".join(errors))
        return results

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        _POOLS.pop(self.world_size, None)


_POOLS: dict[int, _RankPool] = {}


@atexit.register
def _close_pools() -> None:
    for pool in list(_POOLS.values()):
        pool.close()


def run_ranks(world_size: int, fn, *args, timeout: float = 300.0) -> list:
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = _RankPool(world_size)
    return pool.run(fn, args, timeout)
