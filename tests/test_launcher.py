"""A rank started by torchrun dies with it, as the ranks of a job killed whole do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from jobs.launcher import exit_with_torchrun

ROOT = Path(__file__).resolve().parent.parent

# A rank: once its job package is imported, it prints the signal it gets when its parent dies, that of a child it
# spawns (which imports the job package again, as the harvest's writer process does) and whether torch had been
# imported by then, and waits.
RANK = ("import sys, time; import jobs; import multiprocessing; from concurrent.futures import ProcessPoolExecutor; "
        "from jobs.launcher import parent_death_signal; "
        "pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')); "
        "child = pool.submit(parent_death_signal).result(); pool.shutdown(); "  # gone before the rank is killed
        "print(parent_death_signal(), child, 'torch' in sys.modules, sep='-', flush=True); time.sleep(120)")

# A stand-in for torchrun: starts one rank in a session of its own (as torchrun does), says its pid, and waits.
LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    env = {**os.environ, "TORCHELASTIC_RUN_ID": sys.argv[1]} if sys.argv[1] else dict(os.environ)
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[2]], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, text=True)
    print(rank.pid, rank.stdout.readline().strip(), flush=True)
    time.sleep(120)
""")


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, which no reaper collected yet, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rank_after_launcher_is_killed(run_id: str) -> tuple[str, bool]:
    """Start a rank through the stand-in launcher (under torchrun's run id, or none), SIGKILL the launcher; what the
    rank's tie said, and whether the rank still runs 5 s later at most."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, run_id, RANK], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
    pid, tied = launcher.stdout.readline().split()
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 5
    while running(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = running(int(pid))
    if alive:
        os.kill(int(pid), signal.SIGKILL)
    return tied, alive


def test_a_rank_dies_with_the_torchrun_that_started_it():
    # tied by importing the job package, before any job module's imports (torch: seconds) run; its spawned child is
    # left to the rank
    assert rank_after_launcher_is_killed("test-run") == (f"{int(signal.SIGKILL)}-0-False", False)


def test_a_process_not_started_by_torchrun_is_left_alone():
    assert exit_with_torchrun({}) is False
    tied, alive = rank_after_launcher_is_killed("")
    assert (tied, alive) == ("0-0-False", True)
