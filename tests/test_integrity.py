"""Damaged stores and failing disks: clear errors naming the problem, and completed blocks always stay valid."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
from zarr.storage import LocalStore

import actstore
from jobs.cli import main as cli
from actstore.errors import ChunkCorruptError, NotAStoreError, SchemaVersionError, StoreWriteError
from actstore.integrity import store_info, verify
from actstore.schema import image_chunk_key
from actstore.writer import StoreWriter
from conftest import bits, block_data, damage_file, record_gets, small_schema, write_blocks


@pytest.fixture
def written_store(store_path):
    schema = small_schema(layers=(0, 4, 8))
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, range(3))
    return store_path, schema


def test_open_a_path_that_is_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError, match="is not an actstore store"):
        actstore.open(tmp_path / "nothing-here")
    import zarr

    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(NotAStoreError, match="not an actstore store \\(no 'actstore' attribute\\)"):
        actstore.open(tmp_path / "plain")


def test_unknown_schema_version(written_store):
    path, _ = written_store
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["actstore"]["schema_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        actstore.open(path)
    with pytest.raises(SchemaVersionError):
        StoreWriter.open(path)


@pytest.mark.parametrize("damage", ["bitflip", "truncate"])
def test_damaged_chunk_is_named_by_reader_and_verify(written_store, damage):
    path, schema = written_store
    damage_file(path / image_chunk_key(1, 2), damage)  # layer state 4, images 8..11

    ds = actstore.open(path)
    # Undamaged chunks still read correctly.
    np.testing.assert_array_equal(bits(ds.image_resid.sel(layer=8).values[:4]), bits(block_data(schema, 0)[0][2]))
    with pytest.raises(ChunkCorruptError, match="layer state 4, images 8..11"):
        ds.image_resid.sel(layer=4).values

    report = verify(path)
    assert not report.ok
    assert [(p.array, p.layer_state, p.first, p.last) for p in report.problems] == [("image_resid", 4, 8, 11)]
    assert cli(["verify", str(path)]) == 1


@pytest.mark.parametrize("name", ["image_id", "prompt", "text_position", "text_image"])
def test_a_damaged_coordinate_chunk_is_an_error_and_named_by_verify(written_store, name):
    """Ids, prompts and text-token coordinates carry a crc32c like the activations: a flipped bit is an error naming
    the chunk, never wrong ids or positions, and ``verify --repair`` hands its block back to the harvest."""
    import zarr

    from actstore.integrity import damaged_blocks, withdraw_markers

    path, schema = written_store
    assert [type(c).__name__ for c in zarr.open_group(path, mode="r")[name].metadata.codecs][-1] == "Crc32cCodec"
    damage_file(path / name / "c" / "1", "bitflip")
    with pytest.raises(ChunkCorruptError, match=f"{name}/c/1|array '{name}'"):
        actstore.open(path)[name].values
    report = verify(path)
    assert [(p.array, p.layer_state, p.block, p.block_complete) for p in report.problems] == [(name, None, 1, True)]
    images = name in ("image_id", "prompt")
    unit, first = ("images", schema.block_images) if images else ("text tokens", schema.text_slots_per_block)
    assert str(report.problems[0]).startswith(f"{name}: {unit} {first}..")
    assert f"(block 1, completed): chunk {name}/c/1 failed to decode" in str(report.problems[0])
    assert withdraw_markers(path, damaged_blocks(report)) == [1]
    assert actstore.open(path).sizes["image"] == 8  # readers leave the block out until the harvest rewrites it


@pytest.mark.parametrize("sharded", [False, True])
def test_verify_decodes_a_local_store_itself_and_finds_what_zarr_finds(store_path, sharded, monkeypatch):
    """verify decodes a local store's chunks in its own threads; through a file:// URL zarr decodes them: both name
    the same damaged and missing chunks."""
    from actstore.schema import text_chunk_key

    schema = small_schema(layers=(0, 4, 8), chunk_images=2 if sharded else None)
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, range(3))
    for key, damage in ((image_chunk_key(1, 2), "bitflip"), (text_chunk_key(2, 0), "truncate"),
                        ("prompt/c/1", "bitflip")):
        damage_file(store_path / key, damage)
    os.remove(store_path / image_chunk_key(0, 1))
    asked = record_gets(monkeypatch, LocalStore)
    local = verify(store_path)
    monkeypatch.undo()
    assert not [key for key in asked if "/c/" in key and not key.startswith("layer/")]  # no chunk through zarr
    by_zarr = verify(store_path.resolve().as_uri())
    found = [(p.array, p.layer_state, p.block, p.block_complete) for p in local.problems]
    assert sorted(found, key=str) == sorted([("image_resid", 4, 2, True), ("text_resid", 8, 0, True),
                                             ("image_resid", 0, 1, True), ("prompt", None, 1, True)], key=str)
    assert found == [(p.array, p.layer_state, p.block, p.block_complete) for p in by_zarr.problems]
    assert local.chunks_checked == by_zarr.chunks_checked


def test_missing_chunk_of_a_completed_block(written_store):
    path, _ = written_store
    os.remove(path / image_chunk_key(0, 1))
    assert "DAMAGED" in store_info(path)["verdict"]
    report = verify(path)
    assert [str(p) for p in report.problems] == [
        f"image_resid: layer state 0, images 4..7 (block 1, completed): chunk {image_chunk_key(0, 1)} is missing"
    ]
    # And it can never pass for data: a missing chunk reads as NaN, not zeros.
    assert np.isnan(actstore.open(path).image_resid.sel(layer=0).values[4:8].astype(np.float32)).all()


def test_verify_and_info_on_a_good_store(written_store, capsys):
    path, _ = written_store
    assert verify(path).ok
    info = store_info(path)
    assert info["blocks_complete"] == 3 and info["images"] == 12
    assert info["bytes_logical"] == 3 * 12 * (5 * 12 * 2) + 3 * 11 * 3 * 12 * 2
    assert info["verdict"].startswith("OK")
    files = [f for f in path.rglob("*") if f.is_file()]
    assert info["bytes_stored"] == sum(f.stat().st_size for f in files) > 0
    through_fsspec = store_info(path.resolve().as_uri())  # listed and sized by the store, not by a walk of the folder
    assert {k: v for k, v in through_fsspec.items() if k != "location"} == {k: v for k, v in info.items()
                                                                             if k != "location"}
    assert cli(["info", str(path)]) == 0
    assert "3 / 4 blocks" in capsys.readouterr().out
    assert cli(["info", "/nonexistent/store.zarr"]) == 2
    (path / "image_resid" / "c" / "1" / "2" / "0" / "0").unlink()
    assert "DAMAGED: 1 chunk(s) of completed blocks are missing" in store_info(path)["verdict"]


def _fail_writes_of_block(monkeypatch, block: int, err: int) -> None:
    """Make every write of ``block``'s chunks fail with OS error ``err`` (what a full or read-only disk does)."""
    import actstore.sink as sink

    real_open = os.open

    def failing_open(path, flags, *args):
        if flags & os.O_WRONLY and f"/{block}/0" in str(path):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(sink.os, "open", failing_open)


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_failing_disk_leaves_completed_blocks_valid(store_path, monkeypatch, err, words):
    schema = small_schema()
    writer = StoreWriter.create(store_path, schema)
    write_blocks(writer, [0])
    _fail_writes_of_block(monkeypatch, 1, err)
    with pytest.raises(StoreWriteError, match=words):
        write_blocks(writer, [1])
    monkeypatch.undo()
    writer.close()
    assert verify(store_path).ok
    assert not list(store_path.rglob("*.partial"))
    assert StoreWriter.open(store_path).missing_blocks() == [1, 2, 3]
    np.testing.assert_array_equal(bits(actstore.open(store_path).image_resid.values), bits(block_data(schema, 0)[0]))


def test_a_block_is_flushed_after_its_data_and_before_its_marker(store_path, monkeypatch):
    """Batched durability: one flush per block, when every chunk is in place and the block is not yet marked."""
    from actstore.sink import LocalSink
    from actstore.schema import marker_key

    schema = small_schema()
    seen = []
    real_flush = LocalSink.flush

    def flush(self):
        chunks = [f for f in (store_path / "image_resid" / "c").rglob("*") if f.is_file() and "partial" not in f.name]
        seen.append((len(chunks), (store_path / marker_key(0)).exists()))
        real_flush(self)

    monkeypatch.setattr(LocalSink, "flush", flush)
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [0])
    assert seen == [(len(schema.layers), False)]
    assert (store_path / marker_key(0)).exists()


def test_a_failed_flush_leaves_the_block_missing(store_path, monkeypatch):
    from actstore.sink import LocalSink

    schema = small_schema()
    writer = StoreWriter.create(store_path, schema)
    write_blocks(writer, [0])

    def failing_flush(self):
        raise StoreWriteError("cannot write '(syncfs)': input/output error")

    monkeypatch.setattr(LocalSink, "flush", failing_flush)
    with pytest.raises(StoreWriteError, match="syncfs"):
        write_blocks(writer, [1])
    monkeypatch.undo()
    writer.close()
    assert StoreWriter.open(store_path).missing_blocks() == [1, 2, 3]
    assert verify(store_path).ok


@pytest.mark.parametrize("batched, how", [(True, "default"), (True, "writeback"), (False, "no syncfs"),
                                          (False, "fsync")])
def test_every_durability_mode_writes_the_same_store(tmp_path, monkeypatch, batched, how):
    """Per-block syncfs where Linux has it (``writeback``: each file's writeback started as it is written); an fsync
    per file and directory elsewhere, or where asked for."""
    import actstore.sink as sink

    if batched and sink._SYNCFS is None:
        pytest.skip("no syncfs on this system")
    if how == "writeback" and sink._SYNC_FILE_RANGE is None:
        pytest.skip("no sync_file_range on this system")
    if how == "no syncfs":
        monkeypatch.setattr(sink, "_SYNCFS", None)
    if how in ("writeback", "fsync"):
        monkeypatch.setenv("ACTSTORE_DURABILITY", how)
    fsyncs, started = [], []
    real_fsync, real_start = sink.os.fsync, sink.start_writeback
    monkeypatch.setattr(sink.os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    monkeypatch.setattr(sink, "start_writeback", lambda fd: started.append(fd) or real_start(fd))
    schema = small_schema()
    with StoreWriter.create(tmp_path / "s.zarr", schema) as writer:
        assert writer.sink.batched is batched
        write_blocks(writer, [0, 1])
    chunks = 2 * len(schema.layers)  # image chunks of two blocks (text chunks too where the schema has them)
    assert (len(fsyncs) >= 2 * chunks) is not batched  # each chunk file and its directory, or neither
    assert len(started) == (2 * chunks if how == "writeback" else 0)  # image and text chunks, as they are written
    want = np.concatenate([block_data(schema, b)[0] for b in (0, 1)], axis=1)
    got = actstore.open(tmp_path / "s.zarr").image_resid.values[:, : want.shape[1]]
    np.testing.assert_array_equal(bits(got), bits(want))


def test_writeback_is_started_on_a_written_file_and_refused_on_a_bad_descriptor(tmp_path):
    import actstore.sink as sink

    if sink._SYNC_FILE_RANGE is None:
        pytest.skip("no sync_file_range on this system")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 8192)
        assert sink.start_writeback(fd)
    finally:
        os.close(fd)
    assert not sink.start_writeback(fd)  # closed: the kernel refuses, and the hint is only reported


def test_an_unknown_durability_mode_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSTORE_DURABILITY", "fdatasync")
    with pytest.raises(ValueError, match="ACTSTORE_DURABILITY must be one of .*'fdatasync'"):
        StoreWriter.create(tmp_path / "s.zarr", small_schema())
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("code, fallback", [(errno.ENOSYS, True), (errno.EIO, False)])
def test_flush_falls_back_to_sync_only_where_syncfs_is_unsupported(tmp_path, monkeypatch, code, fallback):
    import ctypes

    import actstore.sink as sink

    def syncfs(fd):
        ctypes.set_errno(code)
        return -1

    synced = []
    monkeypatch.setattr(sink, "_SYNCFS", syncfs)
    monkeypatch.setattr(sink.os, "sync", lambda: synced.append(True))
    target = sink.LocalSink(tmp_path)
    if fallback:
        target.flush()
        assert synced == [True]
    else:
        with pytest.raises(StoreWriteError, match="syncfs"):
            target.flush()
        assert not synced
