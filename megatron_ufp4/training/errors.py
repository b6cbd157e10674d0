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
import sys

CLAIM_KEY = "megatron_ufp4/failure_reported"  # one claim per job, also for CollectiveFailure
DONE_KEY = "megatron_ufp4/error_printed"


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


def print_error(line: str, file=None, wait_s: float = 5.0) -> None:
    file = file if file is not None else sys.stderr
    store = _store()
    if claim_report():
        print(line, file=file, flush=True)
        if store is not None:
            try:
                store.set(DONE_KEY, "1")
            except Exception:
                pass
        return
    try:  # the claiming rank prints right after claiming; give it time before this rank exits
        store.wait([DONE_KEY], datetime.timedelta(seconds=wait_s))
    except Exception:  # e.g. the claim came from a collective-failure report, which sets no DONE_KEY
        pass
