"""``actstore.open``: a store as a lazy, dask-backed ``xarray.Dataset`` whose dask chunks are the stored chunks."""

from __future__ import annotations

import asyncio
import builtins
import json
import os
from dataclasses import dataclass
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.core.sync import sync
from zarr.storage import LocalStore

from actstore.codecs import ChunkDecoder, ShardIndex, StringChunkDecoder
from actstore.errors import ChunkCorruptError
from actstore.location import list_keys, local_path, open_zarr_store
from actstore.schema import (
    BLOCK_SKIPPED,
    BLOCK_STATUS,
    IMAGE_RESID,
    TEXT_RESID,
    StoreSchema,
    marker_block,
    skip_record_block,
)
from actstore.writer import IMAGE_COORDS, TEXT_COORDS, open_group, read_attributes


@dataclass
class BlockMarker:
    """What a completed block holds."""

    block: int
    images: int
    text_tokens: int


# zarr requests one array's chunks at most ``async.concurrency`` (10) at a time. A store's per-block metadata (marker,
# image ids, prompts) is three small chunks per block, each a round trip on an object store: for 6250 blocks at 20 ms,
# ~45 s per ``actstore.open`` at 10 in flight (benchmarks/bench_open.py). So these are read as several selections at
# once.
METADATA_IN_FLIGHT = 64


def read_rows(reads: Sequence[tuple[zarr.Array, np.ndarray]], in_flight: int = METADATA_IN_FLIGHT) -> list[np.ndarray]:
    """Rows ``rows`` (ascending first-axis indices) of each array: a local store's from its files (see
    :func:`local_chunk_reader`), others through zarr with about ``in_flight`` chunks requested at once across all of
    them, instead of zarr's ``async.concurrency`` per array."""
    readers = [local_chunk_reader(array) for array, _ in reads]
    by_zarr = [i for i, reader in enumerate(readers) if reader is None]
    values = dict(zip(by_zarr, _read_rows_with_zarr([reads[i] for i in by_zarr], in_flight) if by_zarr else []))
    for i, reader in enumerate(readers):
        if reader is not None:
            values[i] = _read_local_rows(reads[i][0], np.asarray(reads[i][1], dtype=np.int64), reader)
    return [values[i] for i in range(len(reads))]


# Threads that read a local store's metadata chunks, LOCAL_RUN files each at a time: on a parallel file system each
# file costs a round trip, which several threads overlap.
LOCAL_READ_THREADS = 8
LOCAL_RUN = 256


def local_chunk_reader(array: zarr.Array) -> "LocalChunks | None":
    """For an array of a local store that is chunked along its first axis alone, in a codec chain that
    :class:`ChunkDecoder` or :class:`StringChunkDecoder` decodes: how to read its chunks. None otherwise: zarr reads
    it.

    A store's per-block metadata (markers, image ids, prompts) is three small chunks a block, and zarr decodes each on
    its one event-loop thread: for the 18750 of a 100k-image store, seconds per ``actstore.open``, where reading and
    decoding the files here takes a tenth of that (benchmarks/bench_open.py)."""
    store = array.store
    if not isinstance(store, LocalStore) or array.shards is not None or array.ndim == 0 \
            or tuple(array.chunks[1:]) != tuple(array.shape[1:]):
        return None
    decoder = ChunkDecoder.for_array(array) or StringChunkDecoder.for_codecs(array.metadata.codecs, array.chunks)
    if decoder is None:
        return None
    directory, encode = os.path.join(store.root, array.path), array.metadata.chunk_key_encoding.encode_chunk_key
    rest = (0,) * (array.ndim - 1)
    return LocalChunks(array.path, os.fspath(store.root), lambda chunk: os.path.join(directory, encode((chunk, *rest))),
                       decoder)


@dataclass
class LocalChunks:
    """How to read the chunks of one array of a local store: the file of a chunk, and their decoder."""

    name: str
    root: str
    file_of: Callable[[int], str]
    decoder: ChunkDecoder | StringChunkDecoder

    def decode(self, chunk: int, data: bytes | None) -> np.ndarray | None:
        """The values of chunk ``chunk`` from its file's bytes (None where it has no file)."""
        if data is None:
            return None
        try:
            return self.decoder.decode(data)
        except ValueError as exc:
            raise ChunkCorruptError(f"corrupt chunk {os.path.relpath(self.file_of(chunk), self.root)} in store "
                                    f"{self.root}: {exc}. Run `actstore verify {self.root}` to check every chunk"
                                    ) from exc


def _file_bytes(paths: Sequence[str]) -> list[bytes | None]:
    """The bytes of each file (None where there is none), read one after another."""
    out: list[bytes | None] = []
    for path in paths:
        try:
            with builtins.open(path, "rb") as f:
                out.append(f.read())
        except FileNotFoundError:
            out.append(None)
    return out


def _read_local_rows(array: zarr.Array, rows: np.ndarray, local: LocalChunks) -> np.ndarray:
    """Rows ``rows`` (ascending) of ``array``, each chunk they fall in read once."""
    size = array.chunks[0]
    chunks, firsts = np.unique(rows // size, return_index=True)
    paths = [local.file_of(int(c)) for c in chunks]
    # Threads only read (the GIL is free meanwhile); decoding is left to this thread, since small decodes in several
    # threads fight over the GIL (3 s instead of 1.6 s for a 100k-image store from the page cache).
    runs = [paths[i:i + LOCAL_RUN] for i in range(0, len(paths), LOCAL_RUN)]
    if len(runs) > 1:
        with ThreadPoolExecutor(min(LOCAL_READ_THREADS, len(runs))) as pool:
            data = [d for run in pool.map(_file_bytes, runs) for d in run]
    else:
        data = _file_bytes(paths)
    strings = array.dtype.kind in "OTU"
    dtype = object if strings else array.dtype
    fill = np.full((size, *array.shape[1:]), array.fill_value, dtype=dtype)
    ends = np.append(firsts[1:], len(rows))
    parts = []
    for chunk, first, end, raw in zip(chunks, firsts, ends, data):
        value = local.decode(int(chunk), raw)
        parts.append((fill if value is None else value)[rows[first:end] - chunk * size])
    return np.concatenate(parts) if parts else np.empty((0, *array.shape[1:]), dtype=dtype)


def _read_rows_with_zarr(reads: Sequence[tuple[zarr.Array, np.ndarray]], in_flight: int) -> list[np.ndarray]:
    """``read_rows`` through zarr: about ``in_flight`` chunks requested at once across all the arrays."""
    per_selection = max(1, int(zarr.config.get("async.concurrency")))
    at_once = max(1, in_flight // per_selection)
    parts: list[tuple[int, np.ndarray]] = []  # (which read, rows of whole chunks), so no chunk is requested twice
    for i, (array, rows) in enumerate(reads):
        rows = np.asarray(rows, dtype=np.int64)
        firsts = np.flatnonzero(np.diff(rows // array.chunks[0], prepend=-1))  # each chunk's first row in ``rows``
        ends = np.append(firsts, len(rows))
        parts += [(i, rows[ends[run[0]]:ends[run[-1] + 1]]) for run in np.array_split(np.arange(len(firsts)), at_once)
                  if len(run)]

    async def read_all() -> list[Any]:
        gate = asyncio.Semaphore(at_once)

        async def read_part(i: int, rows: np.ndarray) -> Any:
            array = reads[i][0]._async_array  # zarr's synchronous Array has no awaitable read: its AsyncArray does
            async with gate:
                if rows[-1] - rows[0] == len(rows) - 1:  # a run: zarr indexes a slice far faster than its rows
                    return await array.getitem(slice(int(rows[0]), int(rows[-1]) + 1))
                return await array.get_orthogonal_selection((rows,) + (slice(None),) * (array.ndim - 1))

        return list(await asyncio.gather(*(read_part(i, rows) for i, rows in parts)))

    values: list[list[np.ndarray]] = [[] for _ in reads]
    for (i, _), value in zip(parts, sync(read_all()) if parts else []):
        values[i].append(np.asarray(value))
    return [np.concatenate(v) if v else np.asarray(array[:0]) for v, (array, _) in zip(values, reads)]


def read_markers(group: zarr.Group) -> dict[int, BlockMarker]:
    """Completion markers of a store, by block."""
    # Only the markers that exist: a store reserved for a whole dataset holds mostly unwritten blocks while it is being
    # harvested, and asking for each of those costs a request on an object store.
    status = group[BLOCK_STATUS]
    blocks = np.asarray(sorted(b for b in map(marker_block, list_keys(group.store, f"{BLOCK_STATUS}/c/"))
                               if b is not None and b < status.shape[0]), dtype=np.int64)
    (values,) = read_rows([(status, blocks)])
    return {int(b): BlockMarker(int(b), int(v[0]), int(v[1])) for b, v in zip(blocks, values) if v[0] >= 0}


def read_skipped(group: zarr.Group, blocks: Iterable[int]) -> list[dict[str, str]]:
    """Inputs that the writers of ``blocks`` recorded as skipped (id, reason, and the block)."""
    # Only the blocks that skipped something have a record: list them rather than ask for every block's (one request
    # per block on an object store; ~1 s for 6250 blocks on a local disk).
    wanted = set(map(int, blocks))
    recorded = sorted(b for b in map(skip_record_block, list_keys(group.store, f"{BLOCK_SKIPPED}/c/")) if b in wanted)
    if not recorded:
        return []
    (records,) = read_rows([(group[BLOCK_SKIPPED], np.asarray(recorded, dtype=np.int64))])
    return [{**item, "block": b} for b, record in zip(recorded, records) if record for item in json.loads(record)]


def describe_chunk(name: str, schema: StoreSchema, key: tuple[slice, ...]) -> str:
    """Which layer / images / text tokens a selection of a stored array covers, for error messages."""
    parts = [f"array {name!r}"]
    if name in (IMAGE_RESID, TEXT_RESID):
        lo, hi = key[0].start or 0, key[0].stop
        states = list(schema.layers[lo:hi])
        parts.append(f"layer state {states[0]}" if len(states) == 1 else f"layer states {states}")
        axis = "images" if name == IMAGE_RESID else "text tokens"
        parts.append(f"{axis} {key[1].start}..{key[1].stop - 1}")
    else:
        parts.append(f"entries {key[0].start}..{key[0].stop - 1}")
    return ", ".join(parts)


class CheckedChunks:
    """Array-like over a zarr array that turns decode and checksum failures into errors naming the chunk.

    In a local store, a selection within one stored chunk is read and decoded in the calling thread
    (:class:`actstore.codecs.ChunkDecoder`), so Dask's threads decode in parallel instead of queueing on zarr's
    event loop (an inner chunk of a sharded array: through the shard's index, reading only that chunk); everything
    else (fsspec stores, chunks never written) is read by zarr."""

    def __init__(self, array: zarr.Array, name: str, schema: StoreSchema, where: str,
                 directory: Path | None = None) -> None:
        self.array, self.name, self.schema, self.where = array, name, schema, where
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.shards = ShardIndex.for_array(array)
        # Not for a shard index laid out otherwise than ours: zarr reads those.
        ours = directory is not None and (self.shards is not None or array.shards is None)
        self.decoder = ChunkDecoder.for_array(array) if ours else None
        self.directory = directory

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        try:
            within = self._read_within_one_chunk(key) if self.decoder is not None else None
            return within if within is not None else self.array[key]
        except (ValueError, RuntimeError, TypeError) as exc:
            bounds = tuple(
                slice(*k.indices(n)[:2]) if isinstance(k, slice) else slice(int(k), int(k) + 1)
                for k, n in zip(key, self.shape)
            )
            raise ChunkCorruptError(
                f"corrupt chunk in store {self.where}: {describe_chunk(self.name, self.schema, bounds)} failed to "
                f"decode ({exc}). Run `actstore verify {self.where}` to list every damaged chunk"
            ) from exc

    def _read_within_one_chunk(self, key: tuple[Any, ...]) -> np.ndarray | None:
        """The selection, if it is a block of slices inside one stored chunk that exists; else None."""
        if len(key) != self.ndim or not all(isinstance(k, slice) for k in key):
            return None
        bounds = [k.indices(n) for k, n in zip(key, self.shape)]
        if any(step != 1 or start >= stop for start, stop, step in bounds):
            return None
        chunk = tuple(start // c for (start, _, _), c in zip(bounds, self.decoder.shape))
        if any(stop > (i + 1) * c for (_, stop, _), i, c in zip(bounds, chunk, self.decoder.shape)):
            return None
        data = self._chunk_bytes(chunk)
        if data is None:  # never written: zarr gives the fill value
            return None
        values = self.decoder.decode(data)
        local = tuple(slice(start - i * c, stop - i * c) for (start, stop, _), i, c in
                      zip(bounds, chunk, self.decoder.shape))
        return values[local]

    def _chunk_bytes(self, chunk: tuple[int, ...]) -> bytes | None:
        """The stored bytes of (inner) chunk ``chunk``, or None if it was never written."""
        encode_key = self.array.metadata.chunk_key_encoding.encode_chunk_key
        if self.shards is None:
            try:
                return (self.directory / encode_key(chunk)).read_bytes()
            except FileNotFoundError:
                return None
        per_shard = self.shards.grid
        shard = tuple(c // n for c, n in zip(chunk, per_shard))
        try:
            with (self.directory / encode_key(shard)).open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size < self.shards.nbytes:
                    raise ValueError(f"shard of {size} bytes is shorter than its index ({self.shards.nbytes} bytes)")
                f.seek(size - self.shards.nbytes)
                where = self.shards.locate(f.read(self.shards.nbytes), tuple(c % n for c, n in zip(chunk, per_shard)))
                if where is None:
                    return None
                f.seek(where[0])
                return f.read(where[1])
        except FileNotFoundError:
            return None


def _lazy(group: zarr.Group, name: str, schema: StoreSchema, where: str, directory: Path | None = None) -> da.Array:
    array = group[name]
    reader = CheckedChunks(array, name, schema, where, None if directory is None else directory / name)
    # One dask chunk per stored chunk (the inner chunk when sharded): a selection reads only what it needs.
    return da.from_array(
        reader, chunks=array.chunks, asarray=False, lock=False, meta=np.empty((0,) * array.ndim, array.dtype),
        name=f"actstore-{name}-{abs(hash((where, name))):x}",
    )


def _complete_index(markers: dict[int, BlockMarker], per_block: int, count: str) -> np.ndarray:
    ranges = [
        np.arange(b * per_block, b * per_block + getattr(markers[b], count), dtype=np.int64) for b in sorted(markers)
    ]
    return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)


def _as_slice_if_prefix(index: np.ndarray) -> slice | np.ndarray:
    return slice(0, len(index)) if np.array_equal(index, np.arange(len(index))) else index


def open(  # noqa: A001 - mirrors xarray.open_dataset / zarr.open
    location: str | os.PathLike[str], *, complete_only: bool = True, storage_options: dict[str, Any] | None = None
) -> xr.Dataset:
    """Open a store lazily as an ``xarray.Dataset`` (local path or fsspec URL).

    With ``complete_only`` (default) the ``image`` and ``text_token`` axes hold only what completed blocks wrote;
    otherwise the whole capacity, where unwritten activations read as NaN.
    """
    where = os.fspath(location)
    store = open_zarr_store(location, read_only=True, storage_options=storage_options)
    group = open_group(store, where, mode="r")
    directory = local_path(where) if isinstance(store, LocalStore) else None
    attrs = read_attributes(group, where)
    schema = attrs.schema
    markers = read_markers(group)

    # The schema's capacity, not the arrays' shapes: growing a store resizes its arrays one by one and records the new
    # capacity last, so a writer killed in between leaves arrays of two lengths, of which the schema's is the shorter.
    n_images, n_text = schema.capacity, schema.text_capacity
    variables: dict[str, Any] = {
        IMAGE_RESID: (("layer", "image", "image_token", "d_model"),
                      _lazy(group, IMAGE_RESID, schema, where, directory)[:, :n_images]),
    }
    coords: dict[str, Any] = {
        "layer": ("layer", group["layer"][:]),
        "image": ("image", np.arange(n_images, dtype=np.int64)),
    }
    # The ids and prompts of complete blocks only, unless the whole capacity is asked for (each block's are one chunk).
    rows = np.arange(n_images) if not complete_only else _complete_index(markers, schema.block_images, "images")
    for name, values in zip(IMAGE_COORDS, read_rows([(group[name], rows) for name in IMAGE_COORDS])):
        full = np.full(n_images, "", dtype=object)  # what zarr reads where nothing was written
        full[rows] = values
        coords[name] = ("image", full)
    has_text = schema.text_tokens_per_image > 0
    if has_text:
        variables[TEXT_RESID] = (("layer", "text_token", "d_model"),
                                 _lazy(group, TEXT_RESID, schema, where, directory)[:, :n_text])
        for name in TEXT_COORDS:
            coords[name] = ("text_token", _lazy(group, name, schema, where)[:n_text])

    ds = xr.Dataset(variables, coords=coords)
    ds.attrs.update(
        {
            "schema_version": attrs.schema_version,
            "layer_convention": attrs.layer_convention,
            "dtype": schema.dtype,
            "created": attrs.created,
            "actstore_version": attrs.actstore_version,
            "blocks_complete": len(markers),
            "blocks_total": schema.n_blocks,
            "block_images": schema.block_images,
            "schema": schema.to_json(),
            "provenance": attrs.provenance,
            "skipped_images": read_skipped(group, markers),
        }
    )
    ds[IMAGE_RESID].attrs["long_name"] = "residual stream at image-token positions"
    if has_text:
        ds[TEXT_RESID].attrs["long_name"] = "residual stream at text-token positions"
    if not complete_only:
        return ds
    selection: dict[str, Any] = {"image": _as_slice_if_prefix(_complete_index(markers, schema.block_images, "images"))}
    if has_text:
        slots = schema.text_slots_per_block
        selection["text_token"] = _as_slice_if_prefix(_complete_index(markers, slots, "text_tokens"))
    return ds.isel(selection)
