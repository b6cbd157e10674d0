"""One error line per job, also under torchrun.

Under torchrun every rank usually hits the same error (a bad value, a damaged checkpoint
that each rank reads), and each would print it.  ``print_error`` prints on the first rank
that claims the report through the process group's store (the claim the trainer's
collective-failure report uses, so a job prints one line either way); the other ranks
wait up to ``wait_s`` until that line is out -- so torchrun, which stops the remaining
ranks when one exits, cannot cut it off -- and stay silent.  Before the process group
exists (e.g. a config error) every rank prints.
"""
from __future__ import annotations

import datetime
import os
import re
import sys

CLAIM_KEY = "megatron_ufp4/failure_reported"  # one claim per job, also for CollectiveFailure
DONE_KEY = "megatron_ufp4/error_printed"


# what a collective that lost its peer raises (gloo: "Timed out waiting ...", a closed socket; NCCL: watchdog)
_COMM_FAILURE = re.compile(r"timed out|timeout|connection (closed|reset|refused)|broken pipe", re.I)


def is_comm_failure(e: BaseException) -> bool:
    import torch.distributed as dist
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and bool(_COMM_FAILURE.search(str(e))))


def _store():
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:  # no store (or the private accessor moved): print on every rank
        return None
    return None


def claim_report() -> bool:
    """True on the first rank of the job that asks (and on every rank without a store)."""
    store = _store()
    try:
        return store is None or store.add(CLAIM_KEY, 1) == 1
    except Exception:  # the store is gone: better a line per rank than none
        return True


def print_error(line: str, file=None, wait_s: float = 5.0, rank0: bool = False) -> None:
    """Print ``line`` once for the job: on the first rank that claims it (``rank0``: on rank 0,
    for a line every rank reaches together).  The others wait until it is out, so that
    torchrun, which stops the remaining ranks when one exits, cannot cut it off."""
    file = file if file is not None else sys.stderr
    store = _store()
    printer = int(os.environ.get("RANK", "0")) == 0 if rank0 else claim_report()
    if store is None or printer:
        print(line, file=file, flush=True)
        if store is not None:
            try:
                store.set(DONE_KEY, "1")
            except Exception:
                pass
        return
    try:
        store.wait([DONE_KEY], datetime.timedelta(seconds=wait_s))
    except Exception:  # the printer is gone or slow: exit anyway
        pass
