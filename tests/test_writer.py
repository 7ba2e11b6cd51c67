"""Writer behaviour: progress, growth, reopening, rewrites, and lazy reads that touch only the needed chunks."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from zarr.storage import FsspecStore, LocalStore

import actstore
from actstore.errors import SchemaMismatchError, StoreWriteError
from actstore.codecs import ChunkEncoder
from actstore.schema import provenance_differences
from actstore.writer import WRITER_NICENESS_INCREMENT, StoreWriter, thread_niceness
from conftest import bits, block_data, damage_file, record_gets, small_schema, write_blocks


def test_missing_blocks_tracks_progress(store_path):
    schema = small_schema(capacity=16)
    with StoreWriter.create(store_path, schema) as writer:
        assert writer.missing_blocks() == [0, 1, 2, 3]
        write_blocks(writer, [0, 2])
        assert writer.missing_blocks() == [1, 3]
        assert writer.missing_blocks(n_images=9) == [1]
        assert writer.completed_blocks() == [0, 2]
    assert StoreWriter.open(store_path).missing_blocks() == [1, 3]


def test_store_grows_past_capacity_and_keeps_old_blocks(store_path):
    schema = small_schema(capacity=8)
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [0])
        write_blocks(writer, [5], n_last=2)  # beyond capacity 8: grows
        assert writer.schema.capacity >= 24
    ds = actstore.open(store_path)
    assert ds.attrs["schema"]["capacity"] >= 24
    np.testing.assert_array_equal(ds.image.values, np.r_[0:4, 20:22])
    want = np.concatenate([block_data(schema, 0)[0], block_data(schema, 5, 2)[0]], axis=1)
    np.testing.assert_array_equal(bits(ds.image_resid.values), bits(want))
    assert StoreWriter.open(store_path).missing_blocks(n_images=24) == [1, 2, 3, 4]


def test_two_writers_growing_a_store_at_once_never_shrink_it(store_path, monkeypatch):
    """Writers of one store (processes writing disjoint blocks) may grow it at once: here writer A reads the stored
    capacity, pauses, and B grows the store further and writes a block there before A resizes and records. The store
    ends at the larger capacity, and every block of either is read back."""
    import threading

    import actstore.writer as writer_module

    schema = small_schema(capacity=8)
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [0])
    a, b = StoreWriter.open(store_path), StoreWriter.open(store_path)
    real, paused, resume = writer_module.read_attributes, threading.Event(), threading.Event()

    def read_then_pause(*args, **kwargs):
        attributes = real(*args, **kwargs)
        if threading.current_thread().name == "writer-a" and not paused.is_set():
            paused.set()
            resume.wait(30)
        return attributes

    monkeypatch.setattr(writer_module, "read_attributes", read_then_pause)
    grow_a = threading.Thread(target=write_blocks, args=(a, [2]), name="writer-a")
    grow_a.start()
    assert paused.wait(30)
    write_blocks(b, [9])  # needs 40 images; A is growing to 16
    resume.set()
    grow_a.join(30)
    a.close()
    b.close()
    ds = actstore.open(store_path)
    assert ds.attrs["schema"]["capacity"] >= 40
    assert ds.image_id.values.tolist() == [f"img-{block}-{i}" for block in (0, 2, 9) for i in range(4)]
    np.testing.assert_array_equal(bits(ds.image_resid.values),
                                  bits(np.concatenate([block_data(schema, x)[0] for x in (0, 2, 9)], axis=1)))


def test_a_store_left_half_grown_still_opens_and_the_next_write_finishes_growing(store_path, monkeypatch):
    """Growing resizes the arrays one by one and records the new capacity last: a writer stopped in between leaves
    arrays of two lengths. Readers go by the recorded capacity, and the next write finishes the growth."""
    from zarr.core.array import AsyncArray

    schema = small_schema(capacity=8)
    real_resize, resized = AsyncArray.resize, []

    async def resize_one_then_stop(self, *args, **kwargs):
        if resized:
            raise RuntimeError("writer stopped while growing the store")
        resized.append(self.path)
        return await real_resize(self, *args, **kwargs)

    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [0, 1])
        monkeypatch.setattr(AsyncArray, "resize", resize_one_then_stop)
        with pytest.raises(RuntimeError, match="while growing"):
            write_blocks(writer, [2])
    monkeypatch.undo()
    assert resized == ["image_resid"]
    ds = actstore.open(store_path)
    assert ds.sizes["image"] == 8 and ds.attrs["schema"]["capacity"] == 8
    np.testing.assert_array_equal(bits(ds.image_resid.values),
                                  bits(np.concatenate([block_data(schema, b)[0] for b in (0, 1)], axis=1)))
    with StoreWriter.open(store_path) as writer:
        write_blocks(writer, [2])
    ds = actstore.open(store_path)
    assert ds.sizes["image"] == 12
    np.testing.assert_array_equal(bits(ds.image_resid.values),
                                  bits(np.concatenate([block_data(schema, b)[0] for b in (0, 1, 2)], axis=1)))


def test_reopen_with_other_schema_names_every_difference(store_path):
    StoreWriter.create(store_path, small_schema(), {"model": "lm-a", "adapter": "abc"}).close()
    with pytest.raises(SchemaMismatchError) as err:
        StoreWriter.open(store_path, small_schema(d_model=16, layers=(0, 1)), {"model": "lm-a"})
    message = str(err.value)
    assert "d_model: store has 12, requested 16" in message
    assert "layers: store has [0, 1, 2], requested [0, 1]" in message
    with pytest.raises(SchemaMismatchError, match="provenance 'adapter': store has 'abc', requested 'def'"):
        StoreWriter.open(store_path, small_schema(), {"adapter": "def"})
    # Same schema (capacity may differ: it grows) and provenance: accepted.
    StoreWriter.open(store_path, small_schema(capacity=64), {"model": "lm-a"}).close()


def test_a_config_section_that_differs_is_named_by_its_settings():
    stored = {"model": {"lm": "a", "dtype": "float32", "layer": None, "old": 1}, "weights": {"lm": "c1"}}
    requested = {"model": {"lm": "a", "dtype": "bfloat16", "layer": None, "new": 2}, "weights": "c1"}
    assert provenance_differences(stored, requested) == [
        "provenance 'model.dtype': store has 'float32', requested 'bfloat16'",
        "provenance 'model.new': store has none, requested 2",
        "provenance 'model.old': store has 1, requested none",
        "provenance 'weights': store has {'lm': 'c1'}, requested 'c1'",
    ]
    assert provenance_differences(stored, {**stored, "data_commit": "d"}) == []  # added later: older stores reopen
    assert provenance_differences({"model": {"lm": None}}, {"model": {}}) == [
        "provenance 'model.lm': store has None, requested none"]


def test_create_refuses_to_replace_a_store(store_path):
    StoreWriter.create(store_path, small_schema()).close()
    with pytest.raises(StoreWriteError, match="already holds a store"):
        StoreWriter.create(store_path, small_schema())
    StoreWriter.create(store_path, small_schema(), overwrite=True).close()


def test_open_or_create(store_path):
    with StoreWriter.open_or_create(store_path, small_schema()) as writer:
        write_blocks(writer, [0])
    with StoreWriter.open_or_create(store_path, small_schema()) as writer:
        assert writer.completed_blocks() == [0]
    with pytest.raises(SchemaMismatchError):
        StoreWriter.open_or_create(store_path, small_schema(image_tokens=6))


def test_a_create_stopped_before_its_attributes_is_redone_but_other_groups_are_refused(store_path, monkeypatch):
    """A group becomes a store when its attributes are written, last: what a stopped create leaves holds no data, so
    open_or_create (what a rerun calls) creates the store afresh; a group holding anything else is never replaced."""
    import zarr

    import actstore.writer as writer_module
    from actstore.errors import NotAStoreError

    real = writer_module._create_arrays

    def create_then_stop(group, schema):
        real(group, schema)
        raise KeyboardInterrupt("stopped before the attributes")

    monkeypatch.setattr(writer_module, "_create_arrays", create_then_stop)
    with pytest.raises(KeyboardInterrupt):
        StoreWriter.create(store_path, small_schema())
    monkeypatch.undo()
    with pytest.raises(NotAStoreError):
        StoreWriter.open(store_path)
    with StoreWriter.open_or_create(store_path, small_schema()) as writer:
        write_blocks(writer, [0])
    np.testing.assert_array_equal(bits(actstore.open(store_path).image_resid.values),
                                  bits(block_data(small_schema(), 0)[0]))

    other = store_path.parent / "other.zarr"
    group = zarr.open_group(other, mode="w", zarr_format=3)
    group.create_array("image_resid", shape=(4,), dtype="float32")[:] = 1.0  # someone's data under our name
    with pytest.raises(NotAStoreError):
        StoreWriter.open_or_create(other, small_schema())
    np.testing.assert_array_equal(zarr.open_group(other, mode="r")["image_resid"][:], np.ones(4))


def test_rewriting_a_block_replaces_it(store_path):
    schema = small_schema()
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [0])
        other = block_data(schema, 7)
        writer.write_block(0, *other)
    np.testing.assert_array_equal(bits(actstore.open(store_path).image_resid.values), bits(other[0]))


def test_submit_block_overlaps_blocks(store_path):
    schema = small_schema(capacity=32)
    with StoreWriter.create(store_path, schema, max_pending_blocks=3) as writer:
        futures = [writer.submit_block(b, *block_data(schema, b)) for b in range(8)]
        assert [f.result()["block"] for f in futures] == list(range(8))
    ds = actstore.open(store_path)
    want = np.concatenate([block_data(schema, b)[0] for b in range(8)], axis=1)
    np.testing.assert_array_equal(bits(ds.image_resid.values), bits(want))


def test_ready_runs_before_the_block_is_read(store_path):
    """A block whose values arrive late (a GPU copy in flight) is written as it is once ``ready`` returns."""
    schema = small_schema(capacity=8)
    want, ids = block_data(schema, 0)[:2]
    late = np.zeros_like(want)

    def arrive():
        late[...] = want

    with StoreWriter.create(store_path, schema) as writer:
        writer.submit_block(0, late, ids, ready=arrive).result()
    np.testing.assert_array_equal(bits(actstore.open(store_path).image_resid.values[:, : want.shape[1]]), bits(want))


def test_block_timings_say_where_each_block_waited(store_path):
    """The writer keeps, per block, the seconds of each commit step: a block whose data arrives late shows it in
    ``ready``, not in the writing steps."""
    import time

    schema = small_schema(capacity=8)
    with StoreWriter.create(store_path, schema) as writer:
        writer.submit_block(0, *block_data(schema, 0), ready=lambda: time.sleep(0.3)).result()
        writer.write_block(1, *block_data(schema, 1))
        timings = {t["block"]: t for t in writer.block_timings}
    assert sorted(timings) == [0, 1]
    assert timings[0]["ready"] >= 0.3 > timings[1]["ready"]
    for t in timings.values():
        assert set(t) == {"block", "ready", "chunks", "coordinates", "flush", "marker"}
        assert min(v for k, v in t.items() if k != "block") >= 0 and t["chunks"] < 0.3


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_writer_threads_yield_the_cpu_to_the_caller(store_path, monkeypatch):
    """Chunks are encoded and blocks committed on threads nicer than the one that submits them (the GPU feeder)."""
    seen = {}

    encode = ChunkEncoder.encode

    def watched(self, chunk):
        seen.setdefault("encode", thread_niceness())
        return encode(self, chunk)

    monkeypatch.setattr(ChunkEncoder, "encode", watched)
    schema = small_schema(capacity=8)
    with StoreWriter.create(store_path, schema) as writer:
        commit_niceness = lambda: seen.setdefault("commit", thread_niceness())  # noqa: E731
        writer.submit_block(0, *block_data(schema, 0), ready=commit_niceness).result()
    want = min(19, thread_niceness() + WRITER_NICENESS_INCREMENT)
    assert seen == {"encode": want, "commit": want}
    np.testing.assert_array_equal(bits(actstore.open(store_path).image_resid.values[:, :4]),
                                  bits(block_data(schema, 0)[0]))


def test_encoder_threads_follow_the_cores_of_this_rank(monkeypatch):
    """Twice the cores this process may use (its affinity, not the machine's count), shared among the node's ranks."""
    import actstore.writer as writer_module

    monkeypatch.setattr(writer_module.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(writer_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert writer_module.default_threads() == 32
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert writer_module.default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert writer_module.default_threads() == 4  # never fewer than 4: a thread also waits on the disk


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: x[:, :, :4],
         r"image_resid has shape \(3, 4, 4, 12\); this store expects \(layers=3, n, image_tokens=5"),
        (lambda x: x[:2], r"expects \(layers=3"),
        (lambda x: x.astype(np.float32), "dtype float32; this store holds bfloat16"),
        (lambda x: np.concatenate([x, x], axis=1), "a block holds 0..4 images, got 8"),
    ],
)
def test_wrong_shape_or_dtype_is_refused(store_path, change, message):
    schema = small_schema(text_tokens_per_image=0)
    images, ids, prompts, _ = block_data(schema, 0)
    with StoreWriter.create(store_path, schema) as writer:
        with pytest.raises(ValueError, match=message):
            writer.write_block(0, change(images), ids, prompts)
        assert writer.missing_blocks() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layers": ()}, "layers is empty"),
        ({"layers": (0, 2, 2)}, r"layers has duplicates: \(0, 2, 2\)"),
        ({"layers": (-1, 0)}, "layers must be residual-state indices >= 0"),
        ({"d_model": 0}, "d_model must be >= 1, got 0"),
        ({"image_tokens": -3}, "image_tokens must be >= 1, got -3"),
        ({"capacity": -1}, "capacity and text_tokens_per_image must be >= 0"),
        ({"dtype": "int8"}, r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'int8'"),
        ({"codec": "gzip"}, "codec must be one of .*, got 'gzip'"),
        ({"chunk_images": 3}, r"chunk_images \(3\) must divide block_images \(4\)"),
    ],
)
def test_an_invalid_schema_is_refused_by_name_before_a_store_exists(store_path, change, message):
    with pytest.raises(ValueError, match=f"invalid StoreSchema: {message}"):
        StoreWriter.create(store_path, small_schema(**change))
    assert not store_path.exists()


def test_every_problem_of_a_schema_is_named_at_once():
    with pytest.raises(ValueError, match="layers has duplicates.*; d_model must be >= 1.*; codec must be one of"):
        small_schema(layers=(1, 1), d_model=0, codec="lz5")


def test_wrong_text_tokens_are_refused(store_path):
    schema = small_schema()
    images, ids, prompts, text = block_data(schema, 0)
    with StoreWriter.create(store_path, schema) as writer:
        text.resid = text.resid[:, :, :5]
        with pytest.raises(ValueError, match="text resid has shape"):
            writer.write_block(0, images, ids, prompts, text)
        text = block_data(schema, 0)[3]
        text.image = text.image + 10
        with pytest.raises(ValueError, match="within the block"):
            writer.write_block(0, images, ids, prompts, text)
        with pytest.raises(ValueError, match="2 image_ids for 4 images"):
            writer.write_block(0, images, ids[:2], prompts)


class CountingStore(LocalStore):
    """A LocalStore that records every key read."""

    reads: list[str] = []

    async def get(self, key, prototype=None, byte_range=None):  # type: ignore[override]
        CountingStore.reads.append(key)
        return await super().get(key, prototype, byte_range)


@pytest.mark.parametrize("sharded", [False, True])
def test_lazy_selection_reads_only_the_needed_chunk(store_path, monkeypatch, sharded):
    schema = small_schema(chunk_images=2 if sharded else None, layers=(0, 3, 6, 9, 12))
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, range(4))
    monkeypatch.setattr("actstore.location.LocalStore", CountingStore)
    ds = actstore.open(store_path)
    CountingStore.reads.clear()
    value = ds.image_resid.sel(layer=12).isel(image=5).values
    chunk_reads = sorted({k for k in CountingStore.reads if k.startswith("image_resid/c/")})
    # layer state 12 is layer index 4; image 5 lies in block 1
    assert chunk_reads == ["image_resid/c/4/1/0/0"]
    np.testing.assert_array_equal(bits(value), bits(block_data(schema, 1)[0][4, 1]))
    if sharded:  # inside the shard, only the inner chunk holding image 5 (and the index) is fetched
        assert len([k for k in CountingStore.reads if k.startswith("image_resid/c/")]) <= 2


@pytest.mark.parametrize("url_kind", ["file", "memory"])
def test_fsspec_urls(tmp_path, url_kind):
    url = f"file://{tmp_path}/store.zarr" if url_kind == "file" else f"memory://actstore-test-{tmp_path.name}"
    schema = small_schema()
    with StoreWriter.create(url, schema) as writer:
        write_blocks(writer, [0, 1])
    ds = actstore.open(url)
    want = np.concatenate([block_data(schema, b)[0] for b in (0, 1)], axis=1)
    np.testing.assert_array_equal(bits(ds.image_resid.sel(layer=1).values), bits(want[1]))
    assert StoreWriter.open(url).missing_blocks() == [2, 3]


def test_a_put_of_several_buffers_writes_them_back_to_back_through_short_writes(tmp_path, monkeypatch):
    """Chunks go to disk as payload + checksum without being joined first; a vectored write may write less than asked,
    and the rest must follow in order."""
    import os

    from actstore import sink

    real_writev = os.writev

    def at_most_five_bytes(fd, buffers):
        return real_writev(fd, [bytes(buffers[0])[:5]])

    monkeypatch.setattr(sink.os, "writev", at_most_five_bytes)
    parts = [b"abcdefgh", memoryview(np.arange(10, dtype=np.uint16)), b"", bytearray(b"xyz")]
    sink.LocalSink(tmp_path).put("a/b", parts)
    assert (tmp_path / "a" / "b").read_bytes() == b"".join(bytes(memoryview(p).cast("B")) for p in parts)


def test_skipped_inputs_are_read_back_from_their_blocks_records_alone(store_path, monkeypatch):
    """Only blocks that skipped something have a record, and readers ask for those alone (one request per block of a
    store on an object store otherwise); a block rewritten without skips has none again."""
    from actstore.schema import BLOCK_SKIPPED

    schema = small_schema(capacity=16)
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [0, 1, 3])
        writer.write_block(2, *block_data(schema, 2), skipped=[{"id": "x7", "reason": "truncated JPEG"}])
    asked = record_gets(monkeypatch, FsspecStore)
    url = store_path.resolve().as_uri()  # through fsspec, as an object store is read
    assert actstore.open(url).attrs["skipped_images"] == [{"id": "x7", "reason": "truncated JPEG", "block": 2}]
    assert [key for key in asked if key.startswith(f"{BLOCK_SKIPPED}/c/")] == [f"{BLOCK_SKIPPED}/c/2"]
    monkeypatch.undo()
    with StoreWriter.open(store_path) as writer:
        writer.write_block(2, *block_data(schema, 2))
    assert actstore.open(store_path).attrs["skipped_images"] == []


def test_opening_asks_for_complete_blocks_metadata_alone_and_many_at_once(store_path, monkeypatch):
    """``actstore.open`` of a URL reads each complete block's marker, image ids and prompts (three small chunks a
    block, each a round trip on an object store) with many requests in flight, not zarr's 10 per array, and asks
    nothing of blocks reserved but not written (most of a store while it is harvested)."""
    import asyncio

    import zarr

    from actstore.schema import BLOCK_STATUS

    schema = small_schema(capacity=4 * 64, text_tokens_per_image=0)
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, range(48))
    in_flight, most, asked = [0], [0], []
    real_get = FsspecStore.get

    async def get(self, key, *args, **kwargs):
        asked.append(key)
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            await asyncio.sleep(0.02)  # an object store's round trip
            return await real_get(self, key, *args, **kwargs)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(FsspecStore, "get", get)
    url = store_path.resolve().as_uri()  # file://: read through fsspec, as an s3:// URL is
    with zarr.config.set({"async.concurrency": 10}):
        ds = actstore.open(url)
    monkeypatch.undo()
    assert most[0] >= 40, most[0]
    for name in (BLOCK_STATUS, "image_id", "prompt"):
        blocks = sorted(int(key.split("/")[2]) for key in asked if key.startswith(f"{name}/c/"))
        assert blocks == list(range(48)), (name, blocks)
    assert ds.sizes["image"] == 48 * 4
    assert ds.image_id.values[-1] == "img-47-3" and ds.prompt.values[5] == "prompt 1/1"
    whole = actstore.open(url, complete_only=False)  # the reserved blocks read as zarr's fill value
    assert whole.sizes["image"] == 64 * 4 and set(whole.image_id.values[48 * 4:]) == {""}
    assert list(whole.image_id.values[:48 * 4]) == list(ds.image_id.values)


def test_a_local_stores_metadata_is_read_from_its_files_as_zarr_reads_it(store_path, monkeypatch):
    """A local store's per-block metadata is read from its files and decoded here, not through zarr's event loop,
    and equals what zarr reads: markers, ids and prompts, blocks never written (fill values) and skip records."""
    import zarr

    from actstore.reader import read_markers
    from actstore.schema import BLOCK_STATUS

    schema = small_schema(capacity=4 * 700, text_tokens_per_image=0)
    with StoreWriter.create(store_path, schema) as writer:  # 600 blocks: several runs of files, read by threads
        write_blocks(writer, [b for b in range(600) if b % 97 != 5])
        writer.submit_block(600, block_data(schema, 600)[0][:, :2], ["a", "b"], ["p", "q"],
                            skipped=[{"id": "c", "reason": "undecodable"}]).result()
    by_zarr = {}
    for complete_only in (True, False):
        ds = actstore.open(store_path.resolve().as_uri(), complete_only=complete_only)
        by_zarr[complete_only] = (ds.image_id.values, ds.prompt.values, ds.attrs["skipped_images"])
    asked = record_gets(monkeypatch, LocalStore)
    for complete_only in (True, False):
        ds = actstore.open(store_path, complete_only=complete_only)
        ids, prompts, skipped = by_zarr[complete_only]
        assert list(ds.image_id.values) == list(ids) and list(ds.prompt.values) == list(prompts)
        assert ds.attrs["skipped_images"] == skipped == [{"id": "c", "reason": "undecodable", "block": 600}]
    markers = read_markers(zarr.open_group(store_path, mode="r"))
    monkeypatch.undo()
    metadata = (BLOCK_STATUS, "image_id", "prompt", "block_skipped")
    assert not [key for key in asked if key.split("/")[0] in metadata and "/c/" in key]  # none through zarr
    ids = list(ds.image_id.values)  # the whole capacity: blocks never written read as ""
    assert len(ids) == 700 * 4 and ids[5 * 4:6 * 4] == [""] * 4 and ids[600 * 4:] == ["a", "b"] + [""] * 398
    assert ids[:4] == [f"img-0-{i}" for i in range(4)] and ids[599 * 4] == "img-599-0"
    assert len(markers) == 601 - 7 and markers[600].images == 2 and 5 not in markers and 102 not in markers
    assert list(zarr.open_group(store_path, mode="r")[BLOCK_STATUS][:601, 0]) == \
        [markers[b].images if b in markers else -1 for b in range(601)]


@pytest.mark.parametrize("name, damage", [("block_status", "bitflip"), ("image_id", "truncate")])
def test_a_damaged_metadata_chunk_of_a_local_store_is_named(store_path, name, damage):
    from actstore.errors import ChunkCorruptError

    with StoreWriter.create(store_path, small_schema(text_tokens_per_image=0)) as writer:
        write_blocks(writer, range(3))
    chunk = store_path / name / "c" / "1"
    chunk = chunk / "0" if chunk.is_dir() else chunk
    damage_file(chunk, damage)
    with pytest.raises(ChunkCorruptError, match=f"corrupt chunk {name}/c/1"):
        actstore.open(store_path)


def test_s3_urls_get_a_connection_pool_for_many_requests_at_once(monkeypatch, tmp_path):
    """botocore holds 10 connections unless told otherwise, which would queue the readers' 64 requests in flight; a
    pool the caller or fsspec's configuration sets is kept, with their other settings, and other URLs are untouched."""
    import fsspec.config

    import actstore.location as location

    given = []
    monkeypatch.setattr(location.FsspecStore, "from_url",
                        lambda url, storage_options=None, read_only=False: given.append(storage_options))
    monkeypatch.setattr(fsspec.config, "conf", {})
    location.open_zarr_store("s3://bucket/acts.zarr", read_only=True)
    assert given[-1] == {"config_kwargs": {"max_pool_connections": location.S3_CONNECTIONS}}
    location.open_zarr_store("s3://b/a.zarr", read_only=True, storage_options={"anon": True,
                             "config_kwargs": {"max_pool_connections": 8, "connect_timeout": 5}})
    assert given[-1] == {"anon": True, "config_kwargs": {"max_pool_connections": 8, "connect_timeout": 5}}
    monkeypatch.setattr(fsspec.config, "conf", {"s3": {"config_kwargs": {"connect_timeout": 3}}})
    location.open_zarr_store("s3://b/a.zarr", read_only=False)
    assert given[-1] == {"config_kwargs": {"connect_timeout": 3, "max_pool_connections": location.S3_CONNECTIONS}}
    location.open_zarr_store("gcs://b/a.zarr", read_only=True, storage_options={"token": "anon"})
    assert given[-1] == {"token": "anon"}


def test_a_local_stores_keys_are_listed_as_zarr_lists_them(store_path):
    """The walk of a local store's folders lists what zarr's own listing does, temporary files included."""
    from zarr.core.sync import sync

    from actstore.location import list_keys

    with StoreWriter.create(store_path, small_schema()) as writer:
        write_blocks(writer, range(3))
    (store_path / "block_status" / "c" / "1" / "0.0123.partial").write_bytes(b"x")  # as a killed zarr write leaves
    store = LocalStore(store_path, read_only=True)

    async def zarr_keys(prefix):
        return sorted([key async for key in store.list_prefix(prefix)])

    for prefix in ("", "block_status/c/", "image_resid/", "text_resid/c/0/", "nothing/"):
        assert sorted(list_keys(store, prefix)) == sync(zarr_keys(prefix)), prefix
    assert "block_status/c/1/0.0123.partial" in list_keys(store, "block_status/c/")
    assert len(list_keys(store, "image_resid/c/")) == 3 * 3
