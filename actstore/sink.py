"""Durable, atomic puts of whole objects into a store: a local directory or any zarr store (fsspec, memory).

zarr's LocalStore writes through a temporary file and a rename (atomic) but never fsyncs, so a block it wrote may
still be lost by a power cut after we mark it complete. ``LocalSink`` adds the fsyncs; other stores (object
stores, memory) make a put atomic and durable themselves, so ``StoreSink`` just forwards to zarr.
"""

from __future__ import annotations

import errno
import os
import socket
import uuid
from pathlib import Path

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from actstore.errors import StoreWriteError

PARTIAL_SUFFIX = ".partial"
_HOST = socket.gethostname().replace(".", "-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def as_write_error(key: str, where: str, exc: OSError) -> StoreWriteError:
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


class LocalSink:
    """Writes keys under a local directory: temporary file, fsync, rename, fsync of the directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Write ``data`` at ``key`` so that after return it is complete, durable, and never seen half-written."""
        path = self.root / key
        tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise as_write_error(key, str(self.root), exc) from exc

    def make_durable(self, key: str) -> None:
        """fsync a key that zarr wrote (atomically); zarr writes no chunk that is all fill value, so absent is fine."""
        path = self.root / key
        try:
            if not path.exists():
                if path.parent.exists():
                    self._fsync_dir(path.parent)
                return
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._fsync_dir(path.parent)
        except OSError as exc:
            raise as_write_error(key, str(self.root), exc) from exc

    def delete(self, key: str) -> None:
        """Remove ``key`` durably (absent is fine)."""
        path = self.root / key
        try:
            path.unlink(missing_ok=True)
            if path.parent.exists():
                self._fsync_dir(path.parent)
        except OSError as exc:
            raise as_write_error(key, str(self.root), exc) from exc

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Write ``data`` at ``key``."""
        buffer = default_buffer_prototype().buffer.from_bytes(bytes(data))
        try:
            sync(self.store.set(key, buffer))
        except OSError as exc:
            raise as_write_error(key, str(self.store), exc) from exc

    def make_durable(self, key: str) -> None:
        """Nothing to do: the store's put is already durable."""

    def delete(self, key: str) -> None:
        """Remove ``key`` (absent is fine)."""
        try:
            sync(self.store.delete(key))
        except OSError as exc:
            raise as_write_error(key, str(self.store), exc) from exc

    def remove_partials(self) -> int:
        """Nothing to do: the store never exposes partial objects."""
        return 0
