"""Where a store lives: a local path or an fsspec URL, resolved to a zarr store (to read) and a sink (to write)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from actstore.sink import LocalSink, StoreSink


def local_path(location: str | os.PathLike[str]) -> Path | None:
    """The local directory behind ``location``, or None for a remote URL."""
    text = os.fspath(location)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if "://" in text:
        return None
    return Path(text)


def open_zarr_store(
    location: str | os.PathLike[str], *, read_only: bool, storage_options: dict[str, Any] | None = None
) -> Store:
    """A zarr store for ``location``: LocalStore for local paths, FsspecStore for URLs (and ``file://`` reads)."""
    text = os.fspath(location)
    path = local_path(text)
    if path is None or (read_only and "://" in text):
        return FsspecStore.from_url(text, storage_options=storage_options, read_only=read_only)
    return LocalStore(path, read_only=read_only)


def make_sink(location: str | os.PathLike[str], store: Store) -> LocalSink | StoreSink:
    """The durable writer for ``location``: synced files when local, the store's own puts otherwise."""
    path = local_path(location)
    return LocalSink(path) if path is not None else StoreSink(store)


def list_keys(store: Store, prefix: str) -> list[str]:
    """Keys under ``prefix``."""

    async def collect() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return sync(collect())
