"""ProcessWriter: a StoreWriter in a child process writes the same store, refuses bad input in the caller's process,
and neither a dead child nor a dead parent leaves a block that reads as complete but is not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import actstore
from actstore.errors import StoreWriteError
from actstore.integrity import verify
from actstore.process_writer import ProcessWriter
from actstore.writer import StoreWriter, TextTokens
from conftest import bits, block_data, small_schema, write_blocks

HELPER = Path(__file__).parent / "process_writer_helper.py"


def assert_same_store(a: Path, b: Path) -> None:
    """Every activation bit-exact, every coordinate and marker equal."""
    x, y = actstore.open(a), actstore.open(b)
    for name in ("image_resid", "text_resid"):
        np.testing.assert_array_equal(bits(x[name].values), bits(y[name].values))
    for name in ("text_image", "text_position", "text_token_id", "image_id", "prompt"):
        assert x[name].values.tolist() == y[name].values.tolist(), name
    assert StoreWriter.open(a).completed_blocks() == StoreWriter.open(b).completed_blocks()


def test_a_process_writer_writes_the_same_store_as_one_in_process(tmp_path):
    schema = small_schema(capacity=16)
    with StoreWriter.create(tmp_path / "threads.zarr", schema) as writer:
        write_blocks(writer, [0, 2, 3], n_last=3)
    with ProcessWriter(StoreWriter.create(tmp_path / "process.zarr", schema)) as writer:
        write_blocks(writer, [0, 2, 3], n_last=3)
        assert [t["block"] for t in writer.block_timings] == [0, 2, 3]
        assert writer.missing_blocks() == [1]
    assert writer.bytes_written > 0
    assert verify(tmp_path / "process.zarr").ok
    assert_same_store(tmp_path / "threads.zarr", tmp_path / "process.zarr")


def test_the_callers_arrays_are_free_once_released(tmp_path):
    """The block is copied out before it is written: overwriting the caller's arrays after ``released`` changes
    nothing stored."""
    schema = small_schema()
    images, ids, prompts, text = block_data(schema, 0)
    original = images.copy(), text.resid.copy()
    copied = threading.Event()  # the device-to-host copy a harvest's ``ready`` waits for
    with ProcessWriter(StoreWriter.create(tmp_path / "s.zarr", schema)) as writer:
        future = writer.submit_block(0, images, ids, prompts, text, ready=lambda: copied.wait(60))
        time.sleep(0.3)
        assert not future.released.done()  # the arrays are not read before they are ready
        copied.set()
        future.released.result(timeout=60)
        images[...] = 0
        text.resid[...] = 0
        future.result(timeout=60)
    ds = actstore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(bits(ds.image_resid.values[:, :4]), bits(original[0]))
    np.testing.assert_array_equal(bits(ds.text_resid.values[:, : original[1].shape[1]]), bits(original[1]))


def test_bad_input_is_refused_in_the_callers_process(tmp_path):
    schema = small_schema()
    with ProcessWriter(StoreWriter.create(tmp_path / "s.zarr", schema)) as writer:
        write_blocks(writer, [0])
        images, ids, prompts, text = block_data(schema, 1)
        with pytest.raises(ValueError, match="dtype float64; this store holds"):
            writer.submit_block(1, images.astype("float64"), ids, prompts, text)
        with pytest.raises(ValueError, match="image_resid has shape"):
            writer.submit_block(1, images[:, :, :2], ids, prompts, text)
    assert StoreWriter.open(tmp_path / "s.zarr").completed_blocks() == [0]
    assert verify(tmp_path / "s.zarr").ok


def test_a_dead_child_fails_its_blocks_and_every_later_one(tmp_path):
    schema = small_schema()
    writer = ProcessWriter(StoreWriter.create(tmp_path / "s.zarr", schema))
    write_blocks(writer, [0])
    os.kill(writer._process.pid, signal.SIGKILL)
    writer._process.join(timeout=30)
    images, ids, prompts, text = block_data(schema, 1)
    with pytest.raises(StoreWriteError, match="writer process .* stopped"):
        for _ in range(10):  # the first may be accepted before the parent sees the child gone; its future fails
            writer.submit_block(1, images, ids, prompts, text).result(timeout=60)
    with pytest.raises(StoreWriteError, match="exit code -9"):
        writer.close()
    assert StoreWriter.open(tmp_path / "s.zarr").missing_blocks() == [1, 2, 3]
    assert verify(tmp_path / "s.zarr").ok


def test_a_killed_parent_leaves_complete_blocks_and_a_child_that_exits(tmp_path):
    """SIGKILL of the process that feeds the child: the child finishes what it holds and exits; every block marked
    complete is intact, and a rerun of the missing ones gives the store of an uninterrupted run."""
    store, pid_file = tmp_path / "s.zarr", tmp_path / "child.json"
    schema = small_schema(capacity=16)
    subprocess.run([sys.executable, str(HELPER), str(store), str(pid_file)], timeout=120)
    child = json.loads(pid_file.read_text())["child"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert verify(store).ok
    with StoreWriter.open(store) as writer:
        write_blocks(writer, writer.missing_blocks())
    with StoreWriter.create(tmp_path / "whole.zarr", schema) as writer:
        write_blocks(writer, range(4))
    assert_same_store(store, tmp_path / "whole.zarr")


def test_a_child_that_cannot_open_the_store_fails_at_once(tmp_path, monkeypatch):
    import actstore.process_writer as process_writer_module
    from actstore.errors import NotAStoreError

    made = []  # this process's segments: /dev/shm's listing also shows those of tests running beside this one

    class RecordedSharedMemory(process_writer_module.SharedMemory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.name)

    monkeypatch.setattr(process_writer_module, "SharedMemory", RecordedSharedMemory)
    writer = StoreWriter.create(tmp_path / "s.zarr", small_schema())
    (tmp_path / "s.zarr").rename(tmp_path / "moved.zarr")
    with pytest.raises(NotAStoreError, match="s.zarr"):
        ProcessWriter(writer)
    assert not [name for name in made if os.path.exists(f"/dev/shm/{name.lstrip('/')}")]  # its shared memory freed


def test_writer_of_kind_keeps_threads_in_process_and_names_an_unknown_kind(tmp_path):
    from actstore.process_writer import writer_of_kind

    writer = StoreWriter.create(tmp_path / "s.zarr", small_schema())
    assert writer_of_kind(writer, "threads") is writer
    with pytest.raises(ValueError, match="writer must be one of .*'subprocess'"):
        writer_of_kind(writer, "subprocess")
    with writer_of_kind(writer, "process") as child:
        assert isinstance(child, ProcessWriter)
        write_blocks(child, [0])
    assert StoreWriter.open(tmp_path / "s.zarr").completed_blocks() == [0]


def test_blocks_in_the_writers_host_buffers_reach_the_child_without_a_copy(tmp_path):
    """A harvest's host ring in the writer's shared memory: its blocks are written in place (none copied into a slot),
    their buffers are busy until the block is durable, and the store equals one written in process."""
    import torch

    from actstore.harvest import host_ring

    schema = small_schema(capacity=16)
    with StoreWriter.create(tmp_path / "threads.zarr", schema) as writer:
        write_blocks(writer, [0, 1, 2, 3], n_last=3)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[schema.dtype]
    image_shape = (len(schema.layers), schema.block_images, schema.image_tokens, schema.d_model)
    text_shape = (len(schema.layers), schema.text_slots_per_block, schema.d_model)
    with ProcessWriter(StoreWriter.create(tmp_path / "process.zarr", schema)) as writer:
        assert writer.host_buffers(image_shape[:-1] + (5,), text_shape, dtype) is None  # not a block's shape
        with pytest.MonkeyPatch.context() as patch:  # /dev/shm full: the caller's own buffers
            patch.setattr("actstore.process_writer.shared_memory_free", lambda: 0)
            assert writer.host_buffers(image_shape, text_shape, dtype) is None
        ring = host_ring(writer, 2, pin=False)
        for block in range(4):
            images, ids, prompts, text = block_data(schema, block, 3 if block == 3 else None)
            entry = ring.acquire(image_shape, text_shape, dtype)
            n, m = images.shape[1], text.resid.shape[1]
            entry["image"][:, :n].copy_(torch.from_numpy(bits(images)).view(dtype))
            entry["text"][:, :m].copy_(torch.from_numpy(bits(text.resid)).view(dtype))
            future = writer.submit_block(block, entry["image"][:, :n], ids, prompts,
                                         TextTokens(entry["text"][:, :m], text.image, text.position, text.token_id))
            assert future.released is future  # the child reads the buffer until the block is durable
            entry["future"] = future
        future.result(timeout=60)
        assert writer.copied_blocks == 0
        write_blocks(writer, [0])  # arrays of the caller's own: copied into a slot first
        assert writer.copied_blocks == 1
    assert_same_store(tmp_path / "threads.zarr", tmp_path / "process.zarr")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_the_writers_host_buffers_are_pinned_for_the_gpus_copies(tmp_path):
    """On a GPU the shared host buffers are registered with CUDA, so that device-to-host copies into them are
    asynchronous (pageable memory would make each copy wait, at a fraction of the bandwidth), and their blocks are
    written as copied."""
    import torch

    schema = small_schema(capacity=16)
    dtype = torch.bfloat16
    image_shape = (len(schema.layers), schema.block_images, schema.image_tokens, schema.d_model)
    text_shape = (len(schema.layers), schema.text_slots_per_block, schema.d_model)
    with ProcessWriter(StoreWriter.create(tmp_path / "s.zarr", schema)) as writer:
        image, text = writer.host_buffers(image_shape, text_shape, dtype, pin=True)
        assert image.is_pinned() and text.is_pinned()
        images, ids, prompts, tokens = block_data(schema, 0)
        on_gpu = torch.from_numpy(bits(images)).view(dtype).cuda()
        image.copy_(on_gpu, non_blocking=True)
        text[:, : tokens.resid.shape[1]].copy_(torch.from_numpy(bits(tokens.resid)).view(dtype).cuda(),
                                                non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        writer.submit_block(0, image, ids, prompts,
                            TextTokens(text[:, : tokens.resid.shape[1]], tokens.image, tokens.position,
                                       tokens.token_id), ready=done.synchronize).result(timeout=60)
        assert writer.copied_blocks == 0
    ds = actstore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(bits(ds.image_resid.values[:, :4]), bits(images))
