"""Several processes writing one store, and a writer killed with SIGKILL mid-block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import actstore
from actstore.integrity import verify
from actstore.schema import image_chunk_key, marker_key
from actstore.writer import StoreWriter
from writer_process import kill_at_hang_point
from conftest import bits, small_schema, write_blocks

HELPER = str(Path(__file__).parent / "writer_process.py")


def _reference_store(path: Path, blocks) -> "actstore.xarray.Dataset":
    with StoreWriter.create(path, small_schema(capacity=32), {"model": "test"}) as writer:
        write_blocks(writer, blocks)
    return actstore.open(path)


def _assert_same(a, b) -> None:
    for name in ("image_resid", "text_resid", "text_image", "text_position", "text_token_id"):
        np.testing.assert_array_equal(bits(a[name].values) if a[name].dtype.kind != "i" else a[name].values,
                                      bits(b[name].values) if b[name].dtype.kind != "i" else b[name].values)
    assert list(a.image_id.values) == list(b.image_id.values)


def test_two_processes_write_disjoint_blocks(tmp_path):
    path = tmp_path / "shared.zarr"
    StoreWriter.create(path, small_schema(capacity=32), {"model": "test"}).close()
    procs = [
        subprocess.Popen([sys.executable, HELPER, str(path), blocks]) for blocks in ("0,2,4,6", "1,3,5,7")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert StoreWriter.open(path).missing_blocks() == []
    assert verify(path).ok
    _assert_same(actstore.open(path), _reference_store(tmp_path / "ref.zarr", range(8)))


def test_sigkill_mid_block_then_resume(tmp_path):
    path, sentinel = tmp_path / "killed.zarr", tmp_path / "hanging"
    hang_key = image_chunk_key(1, 2)  # layer index 1 of block 2: layer 0 of that block is already written
    proc = subprocess.Popen([sys.executable, HELPER, str(path), "0,1,2,3", hang_key, str(sentinel)])
    kill_at_hang_point(proc, sentinel)

    assert list(path.rglob("*.partial")), "the kill should have left a half-written temporary file"
    writer = StoreWriter.open(path)  # reopening removes the killed writer's temporary files
    assert writer.missing_blocks(n_images=16) == [2, 3]
    writer.close()
    assert not list(path.rglob("*.partial"))
    assert verify(path).ok
    assert actstore.open(path).sizes["image"] == 8

    # Rerunning the same job finishes only what is missing and equals an uninterrupted run.
    resume = subprocess.run([sys.executable, HELPER, str(path), "2,3"], timeout=120)
    assert resume.returncode == 0
    _assert_same(actstore.open(path), _reference_store(tmp_path / "ref.zarr", range(4)))


def test_sigkill_inside_a_markers_write_leaves_the_block_missing(tmp_path):
    """zarr writes a marker through a temporary file and a rename: a writer killed between the two leaves that file
    beside the marker's key. The writer must count the block as missing, as readers do, so that a rerun writes it."""
    path, sentinel = tmp_path / "killed.zarr", tmp_path / "hanging"
    proc = subprocess.Popen([sys.executable, HELPER, str(path), "0,1", marker_key(1), str(sentinel)])
    kill_at_hang_point(proc, sentinel)
    assert list((path / "block_status").rglob("*.partial")), "the kill should have left zarr's temporary file"

    with StoreWriter.open(path) as writer:
        assert writer.missing_blocks(n_images=8) == [1]
    assert actstore.open(path).sizes["image"] == 4
    resume = subprocess.run([sys.executable, HELPER, str(path), "1"], timeout=120)
    assert resume.returncode == 0
    assert StoreWriter.open(path).missing_blocks(n_images=8) == []
    _assert_same(actstore.open(path), _reference_store(tmp_path / "ref.zarr", range(2)))


def test_reopening_keeps_temporary_files_of_live_writers(tmp_path):
    from actstore.sink import _HOST

    path = tmp_path / "s.zarr"
    StoreWriter.create(path, small_schema()).close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    chunk_dir = path / "image_resid" / "c" / "0" / "0" / "0"
    chunk_dir.mkdir(parents=True)
    live_file = chunk_dir / f".0.{_HOST}.{__import__('os').getpid()}.abc.partial"
    dead_file = chunk_dir / f".0.{_HOST}.{int(dead.stdout)}.def.partial"
    live_file.write_bytes(b"in flight")
    dead_file.write_bytes(b"left by a killed writer")
    StoreWriter.open(path).close()
    assert live_file.exists() and not dead_file.exists()
