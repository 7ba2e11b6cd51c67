"""Creating a store is exclusive among processes: a job that finds another's half-made store waits for it instead of
taking it for what a killed create left and replacing it."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import actstore
from actstore.errors import SchemaMismatchError, StoreWriteError
from actstore.integrity import verify
from actstore.location import creation_lock, creation_lock_path
from actstore.writer import StoreWriter
from conftest import bits, block_data, small_schema, write_blocks

HERE = Path(__file__).parent


def test_open_or_create_waits_for_a_create_in_progress_and_then_checks_it(store_path):
    outcome: dict[str, object] = {}

    def second_job() -> None:
        try:
            StoreWriter.open_or_create(store_path, small_schema(d_model=16), {"job": 2}).close()
            outcome["second"] = "created-or-opened"
        except Exception as exc:  # noqa: BLE001 - the test asserts which
            outcome["second"] = exc

    with creation_lock(store_path):  # the first job, halfway through its create
        import zarr

        zarr.open_group(store_path, mode="w-", zarr_format=3)  # its root group, not yet a store
        waiting = threading.Thread(target=second_job)
        waiting.start()
        waiting.join(timeout=1.0)
        # Without the lock the second job would have taken the half-made group for a killed create and replaced it.
        assert waiting.is_alive() and "second" not in outcome
        first = StoreWriter._create_locked(store_path, small_schema(), {"job": 1}, overwrite=True, threads=None,
                                           max_pending_blocks=2, storage_options=None)
    waiting.join(timeout=30)
    assert isinstance(outcome["second"], SchemaMismatchError)
    with first:
        write_blocks(first, [0])
    np.testing.assert_array_equal(bits(actstore.open(store_path).image_resid.values),
                                  bits(block_data(small_schema(), 0)[0]))
    assert not creation_lock_path(store_path).exists()


def test_a_lock_whose_holder_was_killed_does_not_block(store_path):
    lock = creation_lock_path(store_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, time; f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with open(lock) as probe, pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # what a killed create leaves
    StoreWriter.open_or_create(store_path, small_schema()).close()
    assert actstore.open(store_path).attrs and not lock.exists()


def test_a_stuck_creator_gives_a_clear_error_after_the_timeout(store_path):
    with creation_lock(store_path):
        with pytest.raises(StoreWriteError, match=r"another process \(pid \d+ on .*\) has been creating"):
            with creation_lock(store_path, timeout=0.2):
                pass


def test_urls_have_no_creation_lock(tmp_path):
    with creation_lock("memory://somewhere/store.zarr"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_processes_racing_to_create_one_store_leave_one_whole_store(tmp_path):
    """Three jobs with different schemas start at once: one creates the store, the others are refused by its schema,
    and the store is whole (before the lock, a racer could delete the winner's arrays while it created them)."""
    for trial in range(2):
        path = tmp_path / f"raced-{trial}.zarr"
        start = time.time() + 4  # after every interpreter has imported actstore
        racers = [subprocess.Popen([sys.executable, str(HERE / "create_process.py"), str(path), str(d), str(start)],
                                   stdout=subprocess.PIPE, text=True) for d in (12, 16, 20)]
        said = [racer.communicate(timeout=120)[0].strip() for racer in racers]
        assert sorted(said) == ["SchemaMismatchError", "SchemaMismatchError", "created-or-opened"], said
        winner = (12, 16, 20)[said.index("created-or-opened")]
        schema = small_schema(d_model=winner)
        with StoreWriter.open(path, schema, {"d_model": winner}) as writer:  # every array of the schema is there
            write_blocks(writer, [0])
        assert verify(path).ok
        np.testing.assert_array_equal(bits(actstore.open(path).image_resid.values),
                                      bits(block_data(schema, 0)[0]))


def test_a_store_whose_lock_cannot_be_made_is_still_created(store_path, monkeypatch):
    """The lock goes beside the store; where that folder refuses it (a store folder made beforehand in a folder the
    job may not write to), the create goes on with a warning."""
    import builtins

    import actstore.location

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".create-lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(actstore.location, "open", refuse, raising=False)
    with pytest.warns(UserWarning, match="cannot make the creation lock .*Permission denied"):
        StoreWriter.open_or_create(store_path, small_schema()).close()
    assert actstore.open(store_path).attrs["blocks_total"] == small_schema().n_blocks


def test_a_file_system_without_locks_still_creates_with_a_warning(store_path, monkeypatch):
    import errno

    import actstore.location

    def no_locks(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(actstore.location.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="refuses file locks .*not implemented.*not be kept apart"):
        StoreWriter.open_or_create(store_path, small_schema()).close()
    assert actstore.open(store_path).attrs["blocks_total"] == small_schema().n_blocks
