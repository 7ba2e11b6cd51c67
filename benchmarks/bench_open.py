"""Opening a store on an object store: ``actstore.open`` against zarr's own reads of the same per-block metadata, and
the floor that the request latency sets, all measured in one run. Every GET waits a fixed time, so a local store
stands in for S3 or GCS (their first-byte latency is ~10-30 ms). Also the local store opened as a path (its metadata
read from its files, not through zarr) against zarr's reads of it. Writes JSON to benchmarks/results/.

    python benchmarks/bench_open.py                       # 6250 blocks of 16 images (100k images); 0, 5, 20 ms
    python benchmarks/bench_open.py --quick               # tiny, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, WrapperStore

import actstore
import actstore.reader
from actstore.reader import METADATA_IN_FLIGHT
from actstore.schema import BLOCK_STATUS, StoreSchema
from actstore.writer import IMAGE_COORDS, StoreWriter
from bench_store import report_header, save_result


class DelayedStore(WrapperStore):
    """A store whose every GET first waits ``latency`` seconds (an object store's round trip); counts the GETs."""

    def __init__(self, store: Any, latency: float) -> None:
        super().__init__(store)
        self.latency, self.gets = latency, 0

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        """The wrapped store's value for ``key``, after the latency."""
        self.gets += 1
        await asyncio.sleep(self.latency)
        return await self._store.get(key, prototype, byte_range)


def build_store(path: Path, blocks: int, block_images: int) -> None:
    """A store of ``blocks`` complete blocks whose activations are tiny: opening it costs what its metadata costs."""
    schema = StoreSchema(layers=(0,), image_tokens=1, d_model=8, capacity=blocks * block_images,
                         block_images=block_images, text_tokens_per_image=0)
    rows = np.ones((1, block_images, 1, 8), dtype=schema.numpy_dtype)
    with StoreWriter.create(path, schema) as writer:
        futures = [writer.submit_block(b, rows, [f"img-{b}-{i}" for i in range(block_images)],
                                       [f"prompt {b}"] * block_images) for b in range(blocks)]
        for future in futures:
            future.result()


def open_ours(path: Path, latency: float) -> tuple[float, int]:
    """Seconds for ``actstore.open`` through a delayed store, and its GETs."""
    delayed = DelayedStore(LocalStore(path, read_only=True), latency)
    # actstore.open takes a location, not a store object: its store factory is swapped for the delayed one
    real = actstore.reader.open_zarr_store
    actstore.reader.open_zarr_store = lambda *args, **kwargs: delayed
    try:
        start = time.perf_counter()
        ds = actstore.open(path)
        seconds = time.perf_counter() - start
    finally:
        actstore.reader.open_zarr_store = real
    assert ds.sizes["image"] > 0
    return seconds, delayed.gets


def open_local(path: Path) -> float:
    """Seconds for ``actstore.open`` of the local path itself (its metadata read from its files)."""
    start = time.perf_counter()
    ds = actstore.open(path)
    seconds = time.perf_counter() - start
    assert ds.sizes["image"] > 0
    return seconds


def open_zarr_reads(path: Path, latency: float) -> tuple[float, int]:
    """Seconds for zarr's plain reads of what the open reads (markers, image ids, prompts: each array whole)."""
    delayed = DelayedStore(LocalStore(path, read_only=True), latency)
    start = time.perf_counter()
    group = zarr.open_group(delayed, mode="r", zarr_format=3)
    for name in (BLOCK_STATUS, *IMAGE_COORDS):
        group[name][:]
    return time.perf_counter() - start, delayed.gets


def main() -> None:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=6250)
    parser.add_argument("--block-images", type=int, default=16)
    parser.add_argument("--latency-ms", default="0,5,20")
    parser.add_argument("--dir", default=None, help="where to build the store (default: a temp dir)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/open-<host>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.latency_ms = 48, "0,10"
    report = report_header("open", args)
    report["config"]["zarr_async_concurrency"] = int(zarr.config.get("async.concurrency"))
    report["config"]["metadata_in_flight"] = METADATA_IN_FLIGHT
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        path = work / "store.zarr"
        start = time.perf_counter()
        build_store(path, args.blocks, args.block_images)
        print(f"built {args.blocks} blocks in {time.perf_counter() - start:.1f} s")
        results = {}
        for ms in (float(x) for x in args.latency_ms.split(",")):
            ours_s, ours_gets = open_ours(path, ms / 1e3)
            zarr_s, zarr_gets = open_zarr_reads(path, ms / 1e3)
            # The latency floor of the per-block chunks: every one requested, METADATA_IN_FLIGHT at a time.
            floor_s = 3 * args.blocks * (ms / 1e3) / METADATA_IN_FLIGHT
            results[f"{ms:g}ms"] = {
                "open_s": ours_s, "gets": ours_gets, "zarr_reads_s": zarr_s, "zarr_gets": zarr_gets,
                "latency_floor_s": floor_s, "speedup_vs_zarr_reads": zarr_s / ours_s,
                "floor_vs_open": floor_s / ours_s,
            }
            print(f"{ms:g} ms a request: open {ours_s:.2f} s ({ours_gets} GETs), zarr's reads of the same arrays "
                  f"{zarr_s:.2f} s ({zarr_gets} GETs), latency floor {floor_s:.2f} s")
        local_s, zarr_s = open_local(path), open_zarr_reads(path, 0.0)[0]
        results["local"] = {"open_s": local_s, "zarr_reads_s": zarr_s, "speedup_vs_zarr_reads": zarr_s / local_s}
        print(f"local path: open {local_s:.2f} s, zarr's reads of the same arrays {zarr_s:.2f} s")
        report["results"] = results
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_result(report, "open", args.out)


if __name__ == "__main__":
    main()
