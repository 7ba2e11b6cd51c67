"""Where a store lives: a local path or an fsspec URL, resolved to a zarr store (to read) and a sink (to write)."""

from __future__ import annotations

import os
import shutil
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


def free_bytes(location: str | os.PathLike[str]) -> int | None:
    """Free bytes on the file system that holds (or will hold) ``location``; None for a remote URL."""
    path = local_path(location)
    if path is None:
        return None
    path = path.absolute()
    while not path.exists():  # the store may not exist yet: ask about the folder it will be made in
        path = path.parent
    return shutil.disk_usage(path).free


# Connections an S3 file system may hold open at once. botocore's default of 10 would queue what actstore asks for at
# once: a harvest's writer threads putting chunks, and readers asking for many small chunks together
# (``actstore.reader.METADATA_IN_FLIGHT``).
S3_CONNECTIONS = 64


def url_storage_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``storage_options`` for an fsspec URL; for ``s3://``, with a connection pool of ``S3_CONNECTIONS`` unless the
    caller or fsspec's configuration (e.g. ``FSSPEC_S3``) sets one."""
    protocol = url.split("://", 1)[0]
    if protocol not in ("s3", "s3a"):
        return storage_options
    import fsspec.config

    options = dict(storage_options or {})
    # What s3fs would be given without us: the caller's config_kwargs, else fsspec's configured ones (which an explicit
    # config_kwargs would replace whole, so they are carried over)
    configured = [fsspec.config.conf.get(name, {}).get("config_kwargs", {}) for name in ("s3", "s3a")]
    config_kwargs = dict(options["config_kwargs"]) if "config_kwargs" in options else {**configured[0], **configured[1]}
    config_kwargs.setdefault("max_pool_connections", S3_CONNECTIONS)
    return {**options, "config_kwargs": config_kwargs}


def open_zarr_store(
    location: str | os.PathLike[str], *, read_only: bool, storage_options: dict[str, Any] | None = None
) -> Store:
    """A zarr store for ``location``: LocalStore for local paths, FsspecStore for URLs (and ``file://`` reads)."""
    text = os.fspath(location)
    path = local_path(text)
    if path is None or (read_only and "://" in text):
        options = url_storage_options(text, storage_options)
        return FsspecStore.from_url(text, storage_options=options, read_only=read_only)
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
