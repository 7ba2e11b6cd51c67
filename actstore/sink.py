"""Durable, atomic puts of whole objects into a store: a local directory or any zarr store (fsspec, memory).

zarr's LocalStore writes through a temporary file and a rename (atomic) but never fsyncs, so a block it wrote may
still be lost by a power cut after we mark it complete. ``LocalSink`` adds the durability; other stores (object
stores, memory) make a put atomic and durable themselves, so ``StoreSink`` just forwards to zarr.

A writer puts a block's chunks ``deferred`` and calls ``flush`` before it writes the block's completion marker.
Where Linux's ``syncfs`` exists, deferred puts are not fsync'd one by one: ``flush`` makes the whole file system's
pending writes durable at once. On the dev VM's disk (ext4) our writer put 19 MB chunks, 8 threads, at
0.47-0.49 GB/s that way against 0.38-0.45 GB/s with an fsync of each file and its directory (three alternating runs
each): every directory fsync forces a journal commit. Elsewhere every put is durable on return.

``ACTSTORE_DURABILITY=writeback`` also starts each deferred file's writeback as it is written (``sync_file_range``,
which does not wait), as databases do: on a host with much memory the kernel leaves a block's chunks in the page cache
until its ``syncfs``, so the disk may idle while blocks are encoded. In the harvester's pipeline on the dev VM with a
128 GB host's dirty-page limits (``benchmarks/results/writer-pipeline-cpu-2core-vm.json``) a block's syncfs took
0.14-0.17 s instead of 0.53-0.66 s, but the rate did not change (the pipeline already wrote as fast as the raw
sequential write there), so it is not the default until a GPU host's harvest shows it helps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import uuid
from pathlib import Path
from typing import Sequence

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from actstore.codecs import Buffer
from actstore.errors import StoreWriteError

PARTIAL_SUFFIX = ".partial"
_HOST = socket.gethostname().replace(".", "-")


def _libc_function(name: str, argtypes: list | None = None):  # noqa: ANN202 - a ctypes function, or None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    if argtypes is not None:
        function.argtypes = argtypes
    return function


_SYNCFS = _libc_function("syncfs")
_SYNC_FILE_RANGE = _libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages; wait for nothing


def start_writeback(fd: int) -> bool:
    """Ask the kernel to start writing the file's dirty pages to disk now, without waiting (Linux); True if it
    accepted. Only a hint: durability still comes from the flush."""
    return _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_IOV_MAX = 1024  # POSIX guarantees at least 16; Linux allows 1024


def as_parts(data: Buffer | Sequence[Buffer]) -> list[memoryview]:
    """``data`` as a list of flat byte views (one buffer, or several to be written back to back)."""
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    return [memoryview(part).cast("B") for part in parts]


def write_all(fd: int, parts: Sequence[memoryview]) -> None:
    """Write the byte views back to back with vectored writes (no joined copy), resuming after short writes."""
    views = [view for view in parts if view.nbytes]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while written:
            if written >= views[0].nbytes:
                written -= views[0].nbytes
                views.pop(0)
            else:
                views[0], written = views[0][written:], 0


def as_write_error(key: str, where: str, exc: OSError) -> StoreWriteError:
    """A write error that names the key, the store and the cause in words, and says what a rerun does."""
    hint = {
        errno.ENOSPC: "the disk is full",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "the disk quota is exceeded",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return StoreWriteError(
        f"cannot write {key!r} in {where}: {hint} ({exc}). Blocks already marked complete are intact; "
        "this block stays missing and a rerun writes it again."
    )


def fsync_path(path: Path) -> None:
    """fsync one file or folder."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(directory: Path) -> None:
    """Make what another library (xarray, zarr) wrote under ``directory`` durable: every file and folder, and the
    folder's own entry in its parent."""
    for folder, _, files in os.walk(directory):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))
    fsync_path(directory.parent)


DURABILITY_MODES = ("syncfs", "writeback", "fsync")


def durability_mode() -> str:
    """``ACTSTORE_DURABILITY``: "syncfs" (default; one syncfs per block where Linux has it), "writeback" (the same, each
    file's writeback started as it is written) or "fsync" (each file and its directory as it is written; which is
    fastest depends on the file system and the disk)."""
    mode = os.environ.get("ACTSTORE_DURABILITY", "syncfs")
    if mode not in DURABILITY_MODES:
        raise ValueError(f"ACTSTORE_DURABILITY must be one of {DURABILITY_MODES}, got {mode!r}")
    return mode


class LocalSink:
    """Writes keys under a local directory: temporary file, rename; durable through an fsync of the file and its
    directory, or (``batched``, wherever syncfs exists and ``durability_mode()`` is not "fsync") deferred puts through
    one syncfs in ``flush``, their writeback started as they are written (``early_writeback``, mode "writeback")."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        mode = durability_mode()
        self.batched = _SYNCFS is not None and mode != "fsync"
        self.early_writeback = self.batched and mode == "writeback" and _SYNC_FILE_RANGE is not None

    def put(self, key: str, data: Buffer | Sequence[Buffer], deferred: bool = False) -> None:
        """Write ``data`` (one buffer, or buffers back to back) at ``key`` so that it is never seen half-written, and
        durable on return (``deferred``: once :meth:`flush` returns)."""
        now = not (deferred and self.batched)
        path = self.root / key
        tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, as_parts(data))
                if now:
                    os.fsync(fd)
                elif self.early_writeback:
                    start_writeback(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if now:
                fsync_path(path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):  # a cleanup that fails too (no folder there) must not hide the cause
                tmp.unlink()
            raise as_write_error(key, str(self.root), exc) from exc

    def flush(self) -> None:
        """Make every deferred put durable: one syncfs of the file system that holds the store."""
        if not self.batched:
            return
        try:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                if _SYNCFS(fd) != 0:
                    code = ctypes.get_errno()
                    if code not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise OSError(code, os.strerror(code))
                    os.sync()  # a file system without syncfs: flush them all
            finally:
                os.close(fd)
        except OSError as exc:
            raise as_write_error("(syncfs)", str(self.root), exc) from exc

    def make_durable(self, key: str, deferred: bool = False) -> None:
        """fsync a key that zarr wrote (atomically); zarr writes no chunk that is all fill value, so absent is fine.
        ``deferred``: leave it to :meth:`flush` where that is batched."""
        if deferred and self.batched:
            return
        path = self.root / key
        try:
            if not path.exists():
                if path.parent.exists():
                    fsync_path(path.parent)
                return
            fsync_path(path)
            fsync_path(path.parent)
        except OSError as exc:
            raise as_write_error(key, str(self.root), exc) from exc

    def delete(self, key: str) -> None:
        """Remove ``key`` durably (absent is fine)."""
        path = self.root / key
        try:
            path.unlink(missing_ok=True)
            if path.parent.exists():
                fsync_path(path.parent)
        except OSError as exc:
            raise as_write_error(key, str(self.root), exc) from exc

    def remove_partials(self) -> int:
        """Delete temporary files left by dead writers of this host; returns how many.

        Files of live processes (other writers of the same store) and of other hosts are left alone: readers never
        see them, and ``actstore info`` counts them.
        """
        count = 0
        for path in self.root.rglob(f"*{PARTIAL_SUFFIX}"):
            fields = path.name.split(".")
            if len(fields) >= 5 and fields[-4] == _HOST and fields[-3].isdigit() and not _alive(int(fields[-3])):
                path.unlink(missing_ok=True)
                count += 1
        return count


class StoreSink:
    """Writes keys through a zarr store, whose single put is atomic (object stores, memory)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def put(self, key: str, data: Buffer | Sequence[Buffer], deferred: bool = False) -> None:
        """Write ``data`` (one buffer, or buffers back to back) at ``key`` (durable on return, deferred or not)."""
        buffer = default_buffer_prototype().buffer.from_bytes(b"".join(as_parts(data)))
        try:
            sync(self.store.set(key, buffer))
        except OSError as exc:
            raise as_write_error(key, str(self.store), exc) from exc

    def make_durable(self, key: str, deferred: bool = False) -> None:
        """Nothing to do: the store's put is already durable."""

    def flush(self) -> None:
        """Nothing to do: every put is already durable."""

    def delete(self, key: str) -> None:
        """Remove ``key`` (absent is fine)."""
        try:
            sync(self.store.delete(key))
        except OSError as exc:
            raise as_write_error(key, str(self.store), exc) from exc

    def remove_partials(self) -> int:
        """Nothing to do: the store never exposes partial objects."""
        return 0
