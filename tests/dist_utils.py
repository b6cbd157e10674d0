"""Run a function on N gloo ranks (separate processes) from a test, and collect results.

    results = run_ranks(4, my_fn, arg1, arg2)   # my_fn(rank, world_size, *args) -> picklable

The function must be importable (module level).  Each rank runs with one thread so four
ranks share two cores sanely; a rank that raises makes run_ranks raise with its traceback.

Rendezvous: the parent process owns a TCPStore bound to port 0 (the kernel picks a free
port and the store keeps it bound), and the ranks connect to it as clients.  Picking a
"free" port, closing it and letting rank 0 bind it later races with every other process
on the machine; a port held from the start cannot be taken.
"""
from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"


def _worker(rank, world_size, port, fn, args, queue, timeout):
    os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        td = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=td)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=td)
        out = fn(rank, world_size, *args)
        queue.put((rank, "ok", out))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 300.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = dist.TCPStore(HOST, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    procs = [ctx.Process(target=_worker, args=(r, world_size, store.port, fn, args, queue, timeout))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = [None] * world_size, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.terminate()
        del store  # closes the port once every rank is done with it
    if errors:
        raise RuntimeError("\n".join(errors))
    return results
