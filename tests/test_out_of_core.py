"""Out of core: the analysis of a store three times larger than a Dask worker's memory limit succeeds, with the
worker's peak memory measured, and visits every token."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

import actstore
from actstore.schema import StoreSchema
from actstore.stats import SAEParams, compute_layer_stats
from actstore.writer import StoreWriter

MEMORY_LIMIT = 640 * 2**20  # the worker process alone (torch, xarray, zarr, dask imported) takes ~350-400 MiB
LAYERS, TOKENS, D, F, BLOCK = 2, 64, 256, 64, 64  # 2 MiB chunks


def worker_peak_rss() -> int:
    """Peak resident memory of the calling process since it started its program, in bytes. VmHWM, not getrusage's
    ru_maxrss: a spawned worker's ru_maxrss also counts its parent's size at the fork that preceded the exec."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def test_analysis_of_a_store_three_times_the_worker_memory(tmp_path):
    from distributed import Client, LocalCluster

    n_blocks = -(-3 * MEMORY_LIMIT // (LAYERS * BLOCK * TOKENS * D * 2)) + 4
    schema = StoreSchema(layers=tuple(range(LAYERS)), image_tokens=TOKENS, d_model=D, capacity=n_blocks * BLOCK,
                         block_images=BLOCK, text_tokens_per_image=0, codec="none")  # stored bytes = logical bytes
    rng = np.random.default_rng(0)
    base = rng.standard_normal((LAYERS, BLOCK, TOKENS, D), dtype=np.float32)
    with StoreWriter.create(tmp_path / "big.zarr", schema) as writer:
        for b in range(n_blocks):
            # a different block each time at no generation cost: roll the images
            block = actstore.bfloat16.to_numpy(torch.from_numpy(np.roll(base, b, axis=1)).to(torch.bfloat16))
            writer.submit_block(b, block, [f"i{b}-{i}" for i in range(BLOCK)])
    stored = sum(p.stat().st_size for p in (tmp_path / "big.zarr").rglob("*") if p.is_file())
    assert stored >= 3 * MEMORY_LIMIT

    g = torch.Generator().manual_seed(0)
    saes = {layer: SAEParams(torch.randn(D, F, generator=g) / D**0.5, torch.full((F,), -0.5),
                             torch.randn(F, D, generator=g) / F**0.5, torch.zeros(D), "relu")
            for layer in range(LAYERS)}
    ds = actstore.open(tmp_path / "big.zarr")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, memory_limit=MEMORY_LIMIT,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        before = client.run(os.getpid)
        stats = compute_layer_stats(ds, saes, backend="reference", scheduler=client)
        (peak,) = client.run(worker_peak_rss).values()
        same_worker = client.run(os.getpid) == before  # the nanny restarts a worker that outgrows its limit
    print(f"store {stored / 2**30:.2f} GiB, worker limit {MEMORY_LIMIT / 2**20:.0f} MiB, "
          f"worker peak RSS {peak / 2**20:.0f} MiB")
    assert peak < MEMORY_LIMIT and same_worker
    assert (stats.n_tokens.sel(kind="image") == n_blocks * BLOCK * TOKENS).all()
    assert np.isfinite(stats.fvu.values).all() and (stats.l0_mean > 0).all()
