"""Opt-in crash fuzzing: SIGKILL a harvest (one process, or two torchrun ranks rerun on one or two) or an analysis (or
its rewrite of a finished one) at random moments, rerun it, and compare with an uninterrupted run. Slow (about 10 s
per round), so skipped unless ``ACTSTORE_FUZZ_ROUNDS`` is set, e.g.

    ACTSTORE_FUZZ_ROUNDS=60 python -m pytest -q tests/test_crash_fuzz.py

``ACTSTORE_FUZZ_SEED`` picks the kill points (default 1). It found a resume bug that the fixed-point kill tests
missed: a writer killed inside zarr's write of a completion marker left a temporary file that counted as the marker."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import actstore
from actstore.integrity import verify
from actstore.stats import open_stats
from jobs.harvest import HarvestConfig, run_harvest
from test_analyze import store_and_suite, write_described_suite  # noqa: F401 - fixture
from test_harvest import _assert_same_store, adapter_dir, write_config  # noqa: F401 - fixture

ROOT = Path(__file__).parents[1]
ROUNDS = int(os.environ.get("ACTSTORE_FUZZ_ROUNDS", "0"))
pytestmark = pytest.mark.skipif(not ROUNDS, reason="crash fuzzing is opt-in: set ACTSTORE_FUZZ_ROUNDS")


def _count(directory: Path) -> int:
    return sum(1 for _ in directory.rglob("*")) if directory.exists() else -1


def _written(store: Path, markers: int) -> Callable[[], bool]:
    """Whether ``store`` holds at least ``markers`` block markers; for -1, whether its folder exists (it is being
    created)."""
    return (lambda: _count(store / "block_status" / "c") >= markers) if markers >= 0 else store.exists


def _timed_run(command: list[str], cwd: Path) -> float:
    """Seconds an uninterrupted run of ``command`` takes (it must succeed)."""
    begun = time.time()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.time() - begun


def _rng() -> random.Random:
    """The kill points' random source, seeded by ``ACTSTORE_FUZZ_SEED``."""
    return random.Random(int(os.environ.get("ACTSTORE_FUZZ_SEED", "1")))


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float, timeout: float = 120) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` holds (or once it has exited); its whole process group if
    it leads one (torchrun and its ranks)."""
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    if os.getpgid(proc.pid) == proc.pid:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("writer", ["threads", "process"])
def test_a_harvest_killed_anywhere_then_rerun_equals_an_uninterrupted_one(adapter_dir, tmp_path, writer):
    config = write_config(tmp_path / "h.yaml", adapter_dir, writer=writer, n_images=80)
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "whole.zarr"))
    command = [sys.executable, "-m", "jobs.harvest", "--config", str(config)]
    rng = _rng()
    for round_ in range(ROUNDS):
        store = tmp_path / f"r{round_}.zarr"
        seen = []
        for _ in range(rng.choice([1, 2, 3])):
            proc = subprocess.Popen([*command, "--out", str(store)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            markers = rng.randint(-1, 9)  # -1: as soon as the store's folder exists, i.e. while it is created
            _kill_when(proc, _written(store, markers), rng.uniform(0.0, 0.02))
            seen.append(markers)
        rerun = subprocess.run([*command, "--out", str(store)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, f"round {round_} (kills after {seen} markers): {rerun.stderr[-2000:]}"
        assert verify(store).ok, f"round {round_}"
        _assert_same_store(store, tmp_path / "whole.zarr")
        shutil.rmtree(store)


def test_a_two_rank_harvest_killed_then_rerun_with_one_or_two_ranks_equals_an_uninterrupted_one(adapter_dir,
                                                                                                 tmp_path):
    config = write_config(tmp_path / "h.yaml", adapter_dir, n_images=80)
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "whole.zarr"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = _rng()

    def job(ranks: int, port: int) -> list[str]:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
        return [sys.executable, *(launcher if ranks == 2 else []), "-m", "jobs.harvest", "--config", str(config)]

    for round_ in range(ROUNDS):
        store = tmp_path / f"r{round_}.zarr"
        # its own session, so that one SIGKILL of the group takes torchrun and both ranks at once
        proc = subprocess.Popen([*job(2, 29600 + round_ % 100), "--out", str(store)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        markers = rng.randint(-1, 8)
        _kill_when(proc, _written(store, markers), rng.uniform(0.0, 0.02))
        ranks = rng.choice([1, 2])
        rerun = subprocess.run([*job(ranks, 29700 + round_ % 100), "--out", str(store)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, f"round {round_} (rerun on {ranks} ranks): {rerun.stderr[-2000:]}"
        assert verify(store).ok, f"round {round_}"
        _assert_same_store(store, tmp_path / "whole.zarr")
        shutil.rmtree(store)


def test_an_analysis_killed_anywhere_then_rerun_equals_an_uninterrupted_one(store_and_suite):
    root, _ = store_and_suite
    store = root / "s.zarr"
    command = [sys.executable, "-m", "jobs.analyze", str(store), "--saes", str(root / "suite.yaml")]
    span = _timed_run(command, root)
    whole = open_stats(str(store), "test-suite")
    rng = _rng()
    for round_ in range(ROUNDS):
        for group in ("analysis", "analysis_partial"):
            shutil.rmtree(store / group, ignore_errors=True)
        for _ in range(rng.choice([1, 2])):
            proc = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _kill_when(proc, lambda: True, rng.uniform(0.5 * span, 1.05 * span))
        rerun = subprocess.run(command, cwd=root, capture_output=True, text=True)
        assert rerun.returncode == 0, f"round {round_}: {rerun.stderr[-2000:]}"
        again = open_stats(str(store), "test-suite")
        for name in whole.data_vars:
            np.testing.assert_array_equal(again[name].values, whole[name].values, err_msg=f"round {round_}: {name}")
    assert actstore.open(store).sizes["image"] > 0  # the activations were never touched


def test_an_analysis_rewrite_killed_anywhere_then_rerun_computes_no_layer_again(store_and_suite):
    """A rerun that changes a finished analysis (descriptions added) rewrites analysis/<suite> in place: killed at any
    moment, its rerun takes every layer from what was kept and saves what an uninterrupted rerun saves."""
    root, _ = store_and_suite
    store = root / "s.zarr"
    plain = [sys.executable, "-m", "jobs.analyze", str(store), "--saes", str(root / "suite.yaml")]
    rewrite = [sys.executable, "-m", "jobs.analyze", str(store), "--saes", str(write_described_suite(root))]
    subprocess.run(plain, cwd=root, check=True, capture_output=True)
    shutil.copytree(store / "analysis", root / "plain-analysis")
    span = _timed_run(rewrite, root)
    whole = open_stats(str(store), "test-suite")
    rng = _rng()
    for round_ in range(ROUNDS):
        shutil.rmtree(store / "analysis")
        shutil.copytree(root / "plain-analysis", store / "analysis")
        for _ in range(rng.choice([1, 2])):
            proc = subprocess.Popen(rewrite, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _kill_when(proc, lambda: True, rng.uniform(0.3 * span, 1.05 * span))
        rerun = subprocess.run(rewrite, cwd=root, capture_output=True, text=True)
        assert rerun.returncode == 0, f"round {round_}: {rerun.stderr[-2000:]}"
        computed = [line for line in rerun.stdout.splitlines() if "/2)" in line and "kept from" not in line]
        assert computed == [], f"round {round_}: computed again: {computed}"
        again = open_stats(str(store), "test-suite")
        for name in whole.data_vars:
            assert again[name].identical(whole[name]), f"round {round_}: {name}"
