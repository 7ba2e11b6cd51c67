"""The harvester's host side at the disk, without a GPU: host buffers and the writer fed as the harvester feeds them (a
micro-batch of images, then its blocks handed over), with each micro-batch's forward pass replaced by tiny torch ops
launched one by one from this thread (as a forward pass launches its kernels, the GIL released around each) or by a
plain wait, next to a raw fsync'd sequential write of the same bytes measured right before each run. Per writer
(threads in this process, or a child process) and ACTSTORE_DURABILITY mode, alternating, so that they compare within
one run. Writes JSON to benchmarks/results/.

    python benchmarks/bench_writer_pipeline.py                 # Gemma-2-2B shapes (27 states x 256 tokens x 2304, bf16)
    python benchmarks/bench_writer_pipeline.py --codec none    # disk-bound even on a 2-core VM
    python benchmarks/bench_writer_pipeline.py --quick         # tiny, for CI

The forward pass takes 0.28 s per 64 images when it runs alone, the H100 host's (bench_harvest: ~227 images/s); the
ops are calibrated to that before the runs. What this leaves out, and bench_harvest on a GPU measures: the device.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_store import GB, activation_like, raw_sequential_write, report_header, save_result  # noqa: E402

from actstore.harvest import HostRing, host_ring  # noqa: E402
from actstore.schema import StoreSchema  # noqa: E402
from actstore.sink import DURABILITY_MODES  # noqa: E402
from actstore.process_writer import writer_of_kind  # noqa: E402
from actstore.writer import DEFAULT_PENDING_BLOCKS, StoreWriter  # noqa: E402


def dirty_page_limits() -> dict[str, int]:
    """The kernel's dirty-page writeback settings (Linux), which decide when written data starts to reach the disk."""
    names = ("dirty_background_ratio", "dirty_ratio", "dirty_background_bytes", "dirty_bytes")
    limits = {}
    for name in names:
        try:
            limits[name] = int(Path(f"/proc/sys/vm/{name}").read_text())
        except (OSError, ValueError):
            pass
    return limits


def filled_ring(writer: Any, schema: StoreSchema, slots: int, source: torch.Tensor) -> HostRing:
    """``writer``'s host ring (as a harvest gets it), its buffers already holding activation-like values (filling
    them is the GPU's copy, not timed)."""
    ring = host_ring(writer, slots, pin=False)
    shape = (len(schema.layers), schema.block_images, schema.image_tokens, schema.d_model)
    for _ in range(slots):
        entry = ring.acquire(shape, (len(schema.layers), 0, schema.d_model), source.dtype)
        entry["image"].copy_(source)
        entry["future"] = None
    return ring


def launch_ops(n: int) -> float:
    """Launch ``n`` tiny torch ops one after another from this thread (a forward pass's launches); returns seconds."""
    x = torch.ones(64)
    start = time.perf_counter()
    for _ in range(n):
        x = x * 1.0001
    return time.perf_counter() - start


def ops_per_second() -> float:
    """How fast this thread launches tiny ops alone (the best of three)."""
    return max(2000 / launch_ops(2000) for _ in range(3))


def run_pipeline(directory: Path, schema: StoreSchema, n_images: int, batch: int, forward: float | int,
                 pending_blocks: int, source: torch.Tensor, writer_kind: str) -> dict:
    """Images/s of one paced harvest into a fresh store (``forward``: seconds to wait, or ops to launch, per
    micro-batch), the seconds spent in the forward passes and waiting for the writer, the encoded bytes and the
    writer's mean seconds per block by commit step."""
    B = schema.block_images
    per_batch = max(1, batch // B)
    ids = [f"i{i}" for i in range(B)]
    wait = forward_s = 0.0
    writer = writer_of_kind(StoreWriter.create(directory / "pipeline.zarr", schema, max_pending_blocks=pending_blocks),
                            writer_kind, max_pending_blocks=pending_blocks)
    ring = filled_ring(writer, schema, per_batch + pending_blocks, source)
    start = time.perf_counter()
    with writer:
        for first in range(0, n_images // B, per_batch):
            t = time.perf_counter()
            launch_ops(forward) if isinstance(forward, int) else time.sleep(forward)
            forward_s += time.perf_counter() - t
            for block in range(first, min(first + per_batch, n_images // B)):
                t = time.perf_counter()
                entry = ring.acquire(tuple(source.shape), (len(schema.layers), 0, schema.d_model), source.dtype)
                future = writer.submit_block(block, entry["image"], ids)
                entry["future"] = getattr(future, "released", future)
                wait += time.perf_counter() - t
    seconds = time.perf_counter() - start
    timings = writer.block_timings
    steps = {k: float(np.mean([t[k] for t in timings])) for k in timings[0] if k != "block"}
    shutil.rmtree(directory / "pipeline.zarr")
    return {"images_per_s": n_images / seconds, "forward_s": forward_s, "write_wait_s": wait, "seconds": seconds,
            "bytes_stored": writer.bytes_written, "writer_seconds_per_block": steps,
            "blocks_copied_for_the_child": getattr(writer, "copied_blocks", None)}


def main() -> None:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--block-images", type=int, default=16)
    parser.add_argument("--forward-seconds", type=float, default=0.28,
                        help="a micro-batch's forward pass, alone (of --batch images)")
    parser.add_argument("--forward", choices=("ops", "sleep"), default="ops",
                        help="launch tiny torch ops for that long (calibrated), or sleep")
    parser.add_argument("--pending-blocks", type=int, default=DEFAULT_PENDING_BLOCKS)
    parser.add_argument("--writer", default="threads,process", help="comma-separated: threads, process")
    parser.add_argument("--durability", default="syncfs", help=f"comma-separated modes of {DURABILITY_MODES}")
    parser.add_argument("--codec", default="zstd")
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs of every mode")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args()
    states, tokens, d_model = 27, 256, 2304
    if args.quick:
        args.images, args.batch, args.block_images, args.forward_seconds, args.repeat = 32, 16, 8, 0.01, 1
        states, tokens, d_model = 3, 16, 64
    schema = StoreSchema(layers=tuple(range(states)), image_tokens=tokens, d_model=d_model, capacity=args.images,
                         block_images=args.block_images, codec=args.codec, clevel=1)
    source = torch.from_numpy(activation_like(np.random.default_rng(0), (states, args.block_images, tokens, d_model),
                                              np.float32)).to(torch.bfloat16)
    directory = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir=args.dir))
    settings = [(w, m) for w in args.writer.split(",") for m in args.durability.split(",")]
    runs: dict[str, list[dict]] = {f"{w}-{m}": [] for w, m in settings}
    logical_per_image = states * tokens * d_model * 2
    torch.set_num_threads(1)  # tiny ops: one thread, as a GPU forward pass's launching thread
    rate = ops_per_second()
    forward: float | int = round(rate * args.forward_seconds) if args.forward == "ops" else args.forward_seconds
    errors: dict[str, str] = {}  # settings that could not run here (a child writer without /dev/shm room, say)
    try:
        for _ in range(args.repeat):
            for writer_kind, mode in settings:
                os.environ["ACTSTORE_DURABILITY"] = mode
                raw = raw_sequential_write(directory, max(args.images * logical_per_image, 64 << 20))
                try:
                    run = run_pipeline(directory, schema, args.images, args.batch, forward, args.pending_blocks,
                                       source, writer_kind)
                except Exception as exc:  # noqa: BLE001 - this setting's error, beside the others' rates
                    errors[f"{writer_kind}-{mode}"] = f"{type(exc).__name__}: {exc}"
                    print(f"{writer_kind:7s} {mode:9s} failed: {exc}", flush=True)
                    shutil.rmtree(directory / "pipeline.zarr", ignore_errors=True)
                    continue
                stored_per_image = run["bytes_stored"] / args.images
                run.update(raw_write_GBps=raw, disk_bound_images_per_s=raw * GB / stored_per_image)
                limit = min(run["disk_bound_images_per_s"], args.batch / args.forward_seconds)
                run["ratio_to_limit"] = run["images_per_s"] / limit
                runs[f"{writer_kind}-{mode}"].append(run)
                print(f"{writer_kind:7s} {mode:9s} raw {raw:5.2f} GB/s, bound {limit:6.1f} images/s | pipeline "
                      f"{run['images_per_s']:6.1f} images/s = {run['ratio_to_limit']:.2f}x, forward "
                      f"{run['forward_s']:.1f} s, waited {run['write_wait_s']:.1f} of {run['seconds']:.1f} s; "
                      "per block "
                      + ", ".join(f"{k} {v:.2f}" for k, v in run["writer_seconds_per_block"].items()), flush=True)
    finally:
        os.environ.pop("ACTSTORE_DURABILITY", None)
        shutil.rmtree(directory, ignore_errors=True)
    header = report_header("writer_pipeline", args)
    report = {
        **header,
        "config": header["config"] | {"states": states, "image_tokens": tokens, "d_model": d_model},
        "dirty_page_limits": dirty_page_limits(),
        "ops_per_s_alone": rate,
        "forward_ops_per_batch": forward if args.forward == "ops" else None,
        "forward_s_alone": args.forward_seconds * (args.images // args.batch),
        "runs": runs,  # per "<writer>-<durability>", in the order run (settings alternate)
        "errors": errors,
        "images_per_s": {mode: [r["images_per_s"] for r in rs] for mode, rs in runs.items()},
        "ratio_to_limit": {mode: [r["ratio_to_limit"] for r in rs] for mode, rs in runs.items()},
    }
    save_result(report, "writer-pipeline", args.out)


if __name__ == "__main__":
    main()
