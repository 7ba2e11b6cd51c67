"""A job process's tie to the launcher that started it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Mapping

PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2  # linux/prctl.h
TIED_RANK = "ACTSTORE_TIED_RANK"  # the pid of the rank that tied itself, seen by its children in their environment


def exit_with_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    """Under torchrun, on Linux, have the kernel SIGKILL this process when torchrun dies; whether it did.

    torchrun starts each rank in a session of its own, so a torchrun that is SIGKILLed alone (not a Slurm job, whose
    cgroup goes whole) leaves its ranks running: seen waiting in init_process_group for torch's 30 minutes with the
    model in memory, or harvesting beside the rerun. SIGKILL, as if the whole job had been killed: the stores and
    checkpoints are written so that a rerun finishes whatever a kill leaves."""
    if "TORCHELASTIC_RUN_ID" not in env or not sys.platform.startswith("linux"):
        return False
    if env.get(TIED_RANK, str(os.getpid())) != str(os.getpid()):
        # A rank's spawned child (the harvest's writer process) imports the job again, torchrun's variables and all:
        # it is the rank's to end, and that writer finishes the blocks it holds when the rank dies.
        return False
    parent = os.getppid()
    # torchrun starts its ranks from its main thread, whose end (the parent-death signal follows the thread that
    # forked) is torchrun's own.
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # torchrun died before the tie was made
        os.kill(os.getpid(), signal.SIGKILL)
    os.environ[TIED_RANK] = str(os.getpid())
    return True


def parent_death_signal() -> int:
    """The signal this process gets when its parent dies (0: none; Linux)."""
    signal_number = ctypes.c_int()
    ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(signal_number), 0, 0, 0)
    return signal_number.value
