"""StoreWriter: create or reopen a store and write whole blocks of images (all layers) plus their text tokens."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from actstore import __version__
from actstore.bfloat16 import to_numpy
from actstore.codecs import Buffer, ChunkEncoder, array_codec_kwargs, encode_shard, encoded_size
from actstore.errors import NotAStoreError, SchemaVersionError, StoreWriteError
from actstore.location import creation_lock, list_keys, make_sink, open_zarr_store
from actstore.sink import as_write_error, durability_mode
from actstore.schema import (
    ATTRS_KEY,
    SCHEMA_VERSION,
    IMAGE_RESID,
    BLOCK_SKIPPED,
    BLOCK_STATUS,
    TEXT_RESID,
    StoreAttributes,
    StoreSchema,
    check_compatible,
    image_chunk_key,
    marker_block,
    marker_key,
    skip_record_key,
    text_chunk_key,
)

# Arrays along the image axis and along the text-token axis (resized together when the store grows).
IMAGE_COORDS = ("image_id", "prompt")
TEXT_COORDS = ("text_image", "text_position", "text_token_id")


@dataclass
class TextTokens:
    """Text-token residuals of one block: ``resid`` (layers, m, d_model) and per-token coordinates.

    ``image`` is each token's image index *within the block* (0..n-1), ``position`` its position in the model's
    input sequence, ``token_id`` its vocabulary id.
    """

    resid: Any
    image: Any
    position: Any
    token_id: Any


# Blocks a writer commits at once. Each block's commit is a chain (encode + write its chunks, then one syncfs), so
# with two in flight the disk idles while both encode and the encoders idle while both sync. A harvester holds one host
# buffer per block in flight (~0.5 GB for Gemma-2-2B's 27 states x 16 images). On the H100 host (bench_harvest, one
# run): 33.4 images/s with 2, 40.8 with 4, 38.7 with 8.
DEFAULT_PENDING_BLOCKS = 4


def cores_of_this_rank() -> int:
    """The cores this process may run on (its CPU affinity, which batch schedulers such as Slurm restrict), shared
    evenly with the other ranks of a torchrun on this node (``LOCAL_WORLD_SIZE``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        cores = os.cpu_count() or 2
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_threads() -> int:
    """Encoder threads: twice this rank's cores, because each thread alternates compressing and waiting on fsync'd
    I/O."""
    # Not os.cpu_count(): eight ranks of a 128-core node, each given 16 cores by the scheduler, would start 256 threads
    # each, all competing with the threads that feed the GPUs.
    return max(4, 2 * cores_of_this_rank())


# Writer threads run this much nicer than the process (Linux: niceness is per thread). A harvest's Python thread must
# launch the GPU's next kernels the moment it is runnable; writer threads that compete with it as equals delay every
# launch and starve the GPU. Measured on the dev VM (2 cores, 4 writer threads writing bf16 blocks): one thread's op
# launch rate beside the writer rose from 0.47-0.50x to 0.64-0.69x of its rate alone. The writer loses no throughput
# where cores are spare; where they are not, the disk falls behind and the harvest waits for the writer anyway.
WRITER_NICENESS_INCREMENT = 10


def thread_niceness() -> int:
    """The calling thread's niceness (0 where the OS has no per-thread priority)."""
    if sys.platform != "linux":
        return 0
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def set_thread_niceness(niceness: int) -> None:
    """Make the calling thread at least this nice (Linux); a thread may always lower its own priority."""
    if sys.platform != "linux":
        return
    try:
        if niceness > thread_niceness():
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, niceness))
    except OSError:  # a sandbox that forbids it: the writer still works, only without yielding the CPU
        pass


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _left_by_unfinished_create(keys: list[str]) -> bool:
    """Whether a group's keys are what a create stopped before its attributes leaves: the root's and our arrays'
    metadata, the layer list, zarr's temporary files, and no data."""
    ours = {IMAGE_RESID, TEXT_RESID, "layer", BLOCK_STATUS, BLOCK_SKIPPED, *IMAGE_COORDS, *TEXT_COORDS}
    metadata = {"zarr.json", "layer/c/0", *(f"{name}/zarr.json" for name in ours)}
    return all(key in metadata or re.search(r"\.[0-9a-f]{32}\.partial$", key) for key in keys)


def coordinate_compressors() -> list[Any]:
    """The codecs after serialisation of the small arrays (ids, prompts, skip records, text-token coordinates):
    zarr's default zstd, then a crc32c, so that a damaged chunk is an error rather than wrong ids or positions
    (stores made before 2026-12-03 lack the checksum there, and read as they are)."""
    return [ZstdCodec(level=0, checksum=False), Crc32cCodec()]


def _create_arrays(group: zarr.Group, schema: StoreSchema) -> None:
    """Create every array of a schema-v1 store in an empty group."""
    L, T, D, B, cap = len(schema.layers), schema.image_tokens, schema.d_model, schema.block_images, schema.capacity
    fill = float("nan")  # a chunk that was never written reads as NaN, never as plausible zeros
    inner = schema.chunk_images if schema.sharded else B
    group.create_array(
        IMAGE_RESID,
        shape=(L, cap, T, D),
        dtype=schema.numpy_dtype,
        fill_value=fill,
        dimension_names=("layer", "image", "image_token", "d_model"),
        attributes={"coordinates": "image_id prompt"},
        **array_codec_kwargs(schema, (1, inner, T, D), (1, B, T, D) if schema.sharded else None),
    )
    group.create_array("layer", shape=(L,), chunks=(L,), dtype="int32", dimension_names=("layer",), fill_value=-1)
    group["layer"][:] = np.asarray(schema.layers, dtype="int32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that its variable-length string type is not in the core spec
        for name in IMAGE_COORDS:
            group.create_array(name, shape=(cap,), chunks=(B,), dtype=str, dimension_names=("image",), fill_value="",
                               compressors=coordinate_compressors())
    # Completion markers: one chunk per block, so each block's marker is one atomic key that no other block shares.
    group.create_array(
        BLOCK_STATUS, shape=(schema.n_blocks, 2), chunks=(1, 2), dtype="int64", fill_value=-1,
        dimension_names=("block", "block_field"), compressors=[Crc32cCodec()],
        attributes={"description": "per block: [images, text tokens] written; -1 = not complete"},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # variable-length strings, as above
        group.create_array(
            BLOCK_SKIPPED, shape=(schema.n_blocks,), chunks=(1,), dtype=str, dimension_names=("block",),
            fill_value="", attributes={"description": "per block: JSON list of inputs skipped (id, reason)"},
            compressors=coordinate_compressors(),
        )
    if schema.text_tokens_per_image:
        R = schema.text_slots_per_block
        group.create_array(
            TEXT_RESID,
            shape=(L, schema.text_capacity, D),
            dtype=schema.numpy_dtype,
            fill_value=fill,
            dimension_names=("layer", "text_token", "d_model"),
            attributes={"coordinates": " ".join(TEXT_COORDS)},
            **array_codec_kwargs(schema, (1, R, D), None),
        )
        for name, dtype in zip(TEXT_COORDS, ("int64", "int32", "int32")):
            group.create_array(
                name, shape=(schema.text_capacity,), chunks=(R,), dtype=dtype, dimension_names=("text_token",),
                fill_value=-1, compressors=coordinate_compressors(),
            )


def read_attributes(group: zarr.Group, where: str) -> StoreAttributes:
    """The actstore attributes of a group, or a clear error when it is not an actstore store."""
    meta = group.attrs.get(ATTRS_KEY)
    if not isinstance(meta, dict):
        raise NotAStoreError(f"{where} is a Zarr group but not an actstore store (no '{ATTRS_KEY}' attribute)")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has store schema version {version!r}; actstore {__version__} reads version {SCHEMA_VERSION}"
        )
    return StoreAttributes(
        schema=StoreSchema.from_json(meta["schema"]),
        provenance=meta.get("provenance", {}),
        created=meta.get("created", ""),
        actstore_version=meta.get("actstore_version", ""),
    )


def open_group(store: Any, where: str, mode: str) -> zarr.Group:
    """Open the store's root group, or raise :class:`NotAStoreError`."""
    try:
        return zarr.open_group(store, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
        raise NotAStoreError(f"{where} is not an actstore store: no Zarr v3 group there ({exc})") from exc


class StoreWriter:
    """Writes blocks of a store; several processes may each write disjoint blocks of one store at once.

    Each block is encoded and written by a pool of threads; its completion marker is written only after all its
    chunks and coordinates are durable, so a killed writer leaves that block missing, never torn.
    Arrays handed to :meth:`submit_block` must not be modified until its future is done.
    """

    def __init__(
        self, location: str | os.PathLike[str], group: zarr.Group, store: Any, attrs: StoreAttributes,
        threads: int | None,
        max_pending_blocks: int,
    ) -> None:
        self.location = os.fspath(location)
        self.group = group
        self.store = store
        self.attrs = attrs
        self.sink = make_sink(location, store)
        self.encoder = ChunkEncoder(attrs.schema.codec, attrs.schema.clevel)
        # Absolute, from the creating thread: Linux threads inherit niceness from the thread that starts them (the
        # encode threads start on a commit thread), so an increment applied per thread would compound.
        nicer = (thread_niceness() + WRITER_NICENESS_INCREMENT,)
        self._pool = ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="actstore-encode",
                                        initializer=set_thread_niceness, initargs=nicer)
        self._committer = ThreadPoolExecutor(max_workers=max(1, max_pending_blocks),
                                             thread_name_prefix="actstore-commit",
                                             initializer=set_thread_niceness, initargs=nicer)
        self._pending = threading.BoundedSemaphore(max(1, max_pending_blocks))
        self._grow_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._bytes_written = 0
        self._timings: list[dict[str, float]] = []
        self._arrays: dict[str, zarr.Array] = {}  # opened once: opening reads and parses the array's metadata
        self.sink.remove_partials()

    @property
    def bytes_written(self) -> int:
        """Encoded bytes of the activation chunks this writer has written so far (what they take on disk)."""
        with self._count_lock:
            return self._bytes_written

    @property
    def block_timings(self) -> list[dict[str, float]]:
        """Seconds each written block spent per step on its commit thread: waiting for its data (``ready``), encoding
        and writing its chunks, writing its coordinates, making it durable (``flush``) and writing its marker."""
        with self._count_lock:
            return list(self._timings)

    def _put_chunk(self, key: str, parts: list[Buffer]) -> None:
        self.sink.put(key, parts, deferred=True)  # durable by the flush before the block's marker
        with self._count_lock:
            self._bytes_written += encoded_size(parts)

    @property
    def schema(self) -> StoreSchema:
        """The store's schema (its capacity as last seen by this writer)."""
        return self.attrs.schema

    # ---- creating and opening -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, location: str | os.PathLike[str], schema: StoreSchema, provenance: dict[str, Any] | None = None, *,
        overwrite: bool = False, threads: int | None = None, max_pending_blocks: int = DEFAULT_PENDING_BLOCKS,
        storage_options: dict[str, Any] | None = None,
    ) -> "StoreWriter":
        """Create a new, empty store (``overwrite`` replaces an existing one)."""
        with creation_lock(location):
            return cls._create_locked(location, schema, provenance, overwrite=overwrite, threads=threads,
                                      max_pending_blocks=max_pending_blocks, storage_options=storage_options)

    @classmethod
    def _create_locked(
        cls, location: str | os.PathLike[str], schema: StoreSchema, provenance: dict[str, Any] | None, *,
        overwrite: bool, threads: int | None, max_pending_blocks: int, storage_options: dict[str, Any] | None,
    ) -> "StoreWriter":
        """Create a new store while holding its creation lock."""
        durability_mode()  # a misspelt setting is refused before anything is written
        store = open_zarr_store(location, read_only=False, storage_options=storage_options)
        try:
            # zarr's "w-" looks, then writes: only the creation lock keeps two creators from both passing the look.
            group = zarr.open_group(store, mode="w" if overwrite else "w-", zarr_format=3)
        except (zarr.errors.ContainsGroupError, FileExistsError) as exc:
            raise StoreWriteError(f"{location} already holds a store; open it or pass overwrite=True") from exc
        _create_arrays(group, schema)
        attrs = StoreAttributes(
            schema=schema, provenance=dict(provenance or {}), created=_utc_now(), actstore_version=__version__
        )
        # Written last: a group without these attributes is not a store, so a killed create is never mistaken
        # for an empty store of some schema.
        group.attrs[ATTRS_KEY] = attrs.to_json()
        return cls(location, group, store, attrs, threads, max_pending_blocks)

    @classmethod
    def open(
        cls, location: str | os.PathLike[str], schema: StoreSchema | None = None,
        provenance: dict[str, Any] | None = None, *, threads: int | None = None,
        max_pending_blocks: int = DEFAULT_PENDING_BLOCKS,
        storage_options: dict[str, Any] | None = None,
    ) -> "StoreWriter":
        """Reopen an existing store for writing, refusing one whose schema or provenance differs."""
        store = open_zarr_store(location, read_only=False, storage_options=storage_options)
        group = open_group(store, os.fspath(location), mode="r+")
        attrs = read_attributes(group, os.fspath(location))
        check_compatible(attrs.schema, schema or attrs.schema, attrs.provenance, provenance or {}, os.fspath(location))
        return cls(location, group, store, attrs, threads, max_pending_blocks)

    @classmethod
    def open_or_create(
        cls, location: str | os.PathLike[str], schema: StoreSchema, provenance: dict[str, Any] | None = None, *,
        threads: int | None = None, max_pending_blocks: int = DEFAULT_PENDING_BLOCKS,
        storage_options: dict[str, Any] | None = None,
    ) -> "StoreWriter":
        """Reopen the store at ``location`` if there is one (checking it), else create it."""
        options = dict(threads=threads, max_pending_blocks=max_pending_blocks, storage_options=storage_options)
        try:
            return cls.open(location, schema, provenance, **options)
        except NotAStoreError:
            pass
        # Another job may be creating this store right now: look again, and create, only while holding its lock, or
        # two jobs could each take the other's half-made store for one a killed create left, and replace it.
        with creation_lock(location):
            try:
                return cls.open(location, schema, provenance, **options)
            except NotAStoreError:
                store = open_zarr_store(location, read_only=True, storage_options=storage_options)
                keys = list_keys(store, "")
                if keys and not _left_by_unfinished_create(keys):
                    raise
            # Empty, or a create killed before it wrote the attributes that make a group a store: no data to lose.
            return cls._create_locked(location, schema, provenance, overwrite=bool(keys), **options)

    # ---- progress -------------------------------------------------------------------------------------------
    def completed_blocks(self) -> list[int]:
        """Blocks whose completion marker exists."""
        # The markers' exact keys only: zarr writes a marker through a temporary file ("0.<hex>.partial") and a rename,
        # so a writer killed between the two leaves that file beside the key, and the block is still missing (readers
        # see no marker there).
        keys = list_keys(self.store, f"{BLOCK_STATUS}/c/")
        return sorted(block for block in map(marker_block, keys) if block is not None)

    def missing_blocks(self, n_images: int | None = None) -> list[int]:
        """Blocks still to write to hold ``n_images`` images (default: the whole capacity)."""
        total = self.schema.blocks_for(n_images) if n_images is not None else self.schema.n_blocks
        done = set(self.completed_blocks())
        return [b for b in range(total) if b not in done]

    def block_images(self, block: int) -> range:
        """Global image indices that block ``block`` covers."""
        B = self.schema.block_images
        return range(block * B, (block + 1) * B)

    # ---- writing --------------------------------------------------------------------------------------------
    def write_block(
        self, block: int, image_resid: Any, image_ids: Sequence[str], prompts: Sequence[str] | None = None,
        text: TextTokens | None = None, skipped: Sequence[dict[str, str]] = (),
    ) -> dict[str, Any]:
        """Write one block and wait until it is durable and marked complete; returns its marker."""
        return self.submit_block(block, image_resid, image_ids, prompts, text, skipped).result()

    def submit_block(
        self, block: int, image_resid: Any, image_ids: Sequence[str], prompts: Sequence[str] | None = None,
        text: TextTokens | None = None, skipped: Sequence[dict[str, str]] = (),
        ready: Callable[[], object] | None = None,
    ) -> "Future[dict[str, Any]]":
        """Validate a block now and write it in the background; blocks when too many blocks are in flight.

        ``image_resid`` is (layers, n, image_tokens, d_model) in the store's dtype, n <= block_images (numpy or
        CPU torch). ``skipped`` lists the block's inputs that could not be used (``{"id", "reason"}``); they are
        stored with the block. ``ready``, if given, is called in the background before the activations are read:
        e.g. a CUDA event's ``synchronize`` when they are still being copied from the GPU (only their shapes and the
        text coordinates are read now). The future's result is the block's completion marker.
        """
        images, text_arrays = self.check_block(block, image_resid, image_ids, prompts, text)
        self._ensure_capacity(block)
        self._pending.acquire()
        try:
            future = self._committer.submit(
                self._write_block, block, images, list(image_ids), list(prompts or [""] * len(image_ids)), text_arrays,
                [dict(x) for x in skipped], ready,
            )
        except BaseException:
            self._pending.release()
            raise
        future.add_done_callback(lambda _: self._pending.release())
        return future

    def check_block(
        self, block: int, image_resid: Any, image_ids: Sequence[str], prompts: Sequence[str] | None = None,
        text: TextTokens | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """A block's activations as numpy views (images; text resid and coordinates, or None) once they fit this
        store; ValueError naming what does not."""
        images = self._check_images(block, image_resid, image_ids, prompts)
        return images, self._check_text(text, images.shape[1]) if text is not None else None

    def _check_images(
        self, block: int, image_resid: Any, image_ids: Sequence[str], prompts: Sequence[str] | None
    ) -> np.ndarray:
        s = self.schema
        if not isinstance(block, (int, np.integer)) or block < 0:
            raise ValueError(f"block must be an integer >= 0, got {block!r}")
        images = to_numpy(image_resid)
        expected = (len(s.layers), "n", s.image_tokens, s.d_model)
        if images.ndim != 4 or images.shape[0] != len(s.layers) or images.shape[2:] != (s.image_tokens, s.d_model):
            raise ValueError(
                f"image_resid has shape {tuple(images.shape)}; this store expects (layers={len(s.layers)}, n, "
                f"image_tokens={s.image_tokens}, d_model={s.d_model}), i.e. {expected}"
            )
        if not 0 <= images.shape[1] <= s.block_images:  # 0: every input of the block was skipped
            raise ValueError(f"a block holds 0..{s.block_images} images, got {images.shape[1]}")
        if images.dtype != s.numpy_dtype:
            raise ValueError(
                f"image_resid has dtype {images.dtype}; this store holds {s.dtype}. Cast before writing "
                "(e.g. tensor.to(torch.bfloat16)); the writer never converts silently"
            )
        if len(image_ids) != images.shape[1]:
            raise ValueError(f"{len(image_ids)} image_ids for {images.shape[1]} images")
        if prompts is not None and len(prompts) != images.shape[1]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[1]} images")
        return images

    def _check_text(self, text: TextTokens, n_images: int) -> tuple[np.ndarray, ...]:
        s = self.schema
        if not s.text_tokens_per_image:
            raise ValueError("this store has no text-token region (text_tokens_per_image=0)")
        resid = to_numpy(text.resid)
        coords = [np.asarray(to_numpy(c)).reshape(-1) for c in (text.image, text.position, text.token_id)]
        m = resid.shape[1] if resid.ndim == 3 else -1
        if resid.ndim != 3 or resid.shape[0] != len(s.layers) or resid.shape[2] != s.d_model:
            raise ValueError(
                f"text resid has shape {tuple(resid.shape)}; expected (layers={len(s.layers)}, m, d_model={s.d_model})"
            )
        if resid.dtype != s.numpy_dtype:
            raise ValueError(f"text resid has dtype {resid.dtype}; this store holds {s.dtype}")
        if m > n_images * s.text_tokens_per_image:
            raise ValueError(
                f"{m} text tokens for {n_images} images exceed the store's {s.text_tokens_per_image} per image"
            )
        if any(len(c) != m for c in coords):
            raise ValueError(f"text coordinates must each have {m} entries, got {[len(c) for c in coords]}")
        if m and (coords[0].min() < 0 or coords[0].max() >= n_images):
            raise ValueError(f"text image indices must be within the block, 0..{n_images - 1}")
        return (resid, *coords)

    def reserve(self, n_images: int) -> None:
        """Grow the store now to hold ``n_images`` images: one process, before others write there (a harvest's rank 0),
        so that they never grow it at once."""
        with self._grow_lock:
            self._grow(n_images, double=False)

    def _ensure_capacity(self, block: int) -> None:
        with self._grow_lock:
            if block < self.schema.n_blocks:
                return
            self._grow((block + 1) * self.schema.block_images, double=True)

    def _grow(self, n_images: int, double: bool) -> None:
        """Make the store hold ``n_images`` (``double``: at least twice what it held, so that growth is rare)."""
        # Another process may have grown the store already, or be growing it now: grow from what is stored, and never
        # below what an array or the recorded capacity already holds (tests/test_writer.py pauses one writer mid-way).
        self.group = zarr.open_group(self.store, mode="r+", zarr_format=3)
        self._arrays = {}  # reopened at their new shapes
        stored = read_attributes(self.group, self.location).schema
        if n_images <= stored.capacity:  # grown enough already
            self.attrs.schema = stored
            return
        new = stored.with_capacity(max(n_images, 2 * stored.capacity) if double else n_images)
        lengths = {name: new.capacity for name in (IMAGE_RESID, *IMAGE_COORDS)}
        if new.text_tokens_per_image:
            lengths.update({name: new.text_capacity for name in (TEXT_RESID, *TEXT_COORDS)})
        lengths.update({BLOCK_STATUS: new.n_blocks, BLOCK_SKIPPED: new.n_blocks})
        for name, length in lengths.items():
            array = self.group[name]
            shape = list(array.shape)
            axis = 1 if name in (IMAGE_RESID, TEXT_RESID) else 0
            if shape[axis] < length:
                shape[axis] = length
                sync(array._async_array.resize(tuple(shape), delete_outside_chunks=False))
        latest = read_attributes(zarr.open_group(self.store, mode="r", zarr_format=3), self.location).schema
        self.attrs.schema = new if new.capacity >= latest.capacity else latest
        self.group.attrs[ATTRS_KEY] = self.attrs.to_json()

    def _write_block(
        self, block: int, images: np.ndarray, image_ids: list[str], prompts: list[str],
        text: tuple[np.ndarray, ...] | None, skipped: list[dict[str, str]], ready: Callable[[], object] | None = None,
    ) -> dict[str, Any]:
        marks = [time.perf_counter()]
        if ready is not None:
            ready()
        marks.append(time.perf_counter())
        s, n = self.schema, images.shape[1]
        # A rewrite first withdraws the old marker, so a crash mid-rewrite leaves the block missing, not mixed.
        self.sink.delete(marker_key(block))
        jobs = [self._pool.submit(self._put_image_chunk, block, li, images[li]) for li in range(len(s.layers))]
        m = 0
        if s.text_tokens_per_image:
            resid = text[0] if text is not None else np.zeros((len(s.layers), 0, s.d_model), s.numpy_dtype)
            m = resid.shape[1]
            jobs += [self._pool.submit(self._put_text_chunk, block, li, resid[li]) for li in range(len(s.layers))]
        for job in jobs:
            job.result()
        marks.append(time.perf_counter())
        record = np.array([json.dumps(skipped) if skipped else ""], dtype=object)
        self._zarr_write(
            [*self._coordinate_writes(block, image_ids, prompts, text),
             (BLOCK_SKIPPED, slice(block, block + 1), record, skip_record_key(block))],
            deferred=True,
        )
        marks.append(time.perf_counter())
        self.sink.flush()  # everything of the block is durable before its marker exists
        marks.append(time.perf_counter())
        marker = {"block": block, "images": n, "text_tokens": m, "skipped": len(skipped)}
        status = np.array([[n, m]], dtype="int64")
        self._zarr_write([(BLOCK_STATUS, slice(block, block + 1), status, marker_key(block))])
        marks.append(time.perf_counter())
        steps = ("ready", "chunks", "coordinates", "flush", "marker")
        with self._count_lock:
            self._timings.append({"block": block, **{k: b - a for k, a, b in zip(steps, marks, marks[1:])}})
        return marker

    def _padded(self, rows: np.ndarray, n_rows: int) -> np.ndarray:
        if rows.shape[0] == n_rows:
            return rows
        out = np.zeros((n_rows, *rows.shape[1:]), dtype=rows.dtype)
        out[: rows.shape[0]] = rows
        return out

    def _put_image_chunk(self, block: int, layer_index: int, rows: np.ndarray) -> None:
        s = self.schema
        rows = self._padded(rows, s.block_images)
        data = encode_shard(self.encoder, rows, s.chunk_images) if s.sharded else self.encoder.encode(rows[None])
        self._put_chunk(image_chunk_key(layer_index, block), data)

    def _put_text_chunk(self, block: int, layer_index: int, rows: np.ndarray) -> None:
        rows = self._padded(rows, self.schema.text_slots_per_block)
        self._put_chunk(text_chunk_key(layer_index, block), self.encoder.encode(rows[None]))

    def _coordinate_writes(
        self, block: int, image_ids: list[str], prompts: list[str], text: tuple[np.ndarray, ...] | None
    ) -> list[tuple[str, slice, np.ndarray, str]]:
        """(array, region, values, chunk key) of a block's coordinates: whole chunks of the small arrays."""
        s, n = self.schema, len(image_ids)
        B, R = s.block_images, s.text_slots_per_block
        region = slice(block * B, (block + 1) * B)
        writes = [(name, region, np.array(list(values) + [""] * (B - n), dtype=object), f"{name}/c/{block}")
                  for name, values in (("image_id", image_ids), ("prompt", prompts))]
        if R:
            m = 0 if text is None else len(text[1])
            columns = (np.zeros(0, "int64"),) * 3 if text is None else text[1:]
            offsets = (block * B, 0, 0)
            for name, values, offset, dtype in zip(TEXT_COORDS, columns, offsets, ("int64", "int32", "int32")):
                padded = np.full(R, -1, dtype=dtype)
                padded[:m] = values.astype(dtype) + offset
                writes.append((name, slice(block * R, (block + 1) * R), padded, f"{name}/c/{block}"))
        return writes

    def _array(self, name: str) -> zarr.Array:
        # Under the growth lock, so that no array opened before a resize is cached after it.
        with self._grow_lock:
            if name not in self._arrays:
                self._arrays[name] = self.group[name]
            return self._arrays[name]

    def _zarr_write(self, writes: list[tuple[str, slice, np.ndarray, str]], deferred: bool = False) -> None:
        # Small arrays go through zarr's own writer (whole chunks, atomic renames); we only add the durability. All of
        # them in one trip to zarr's event loop: a block's coordinates took 25 ms on the dev VM written (and their
        # arrays opened) one by one, 8.6 ms this way.
        targets = [(self._array(name)._async_array, region, values) for name, region, values, _ in writes]

        async def write_all() -> None:
            await asyncio.gather(*(array.setitem(region, values) for array, region, values in targets))

        try:
            sync(write_all())
        except OSError as exc:
            raise as_write_error(", ".join(key for *_, key in writes), self.location, exc) from exc
        for *_, key in writes:
            self.sink.make_durable(key, deferred)

    def close(self) -> None:
        """Wait for blocks in flight and release the threads."""
        self._committer.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
