"""Training's data loading against the device's work: a step's images read from a parquet dataset, decoded and
preprocessed (``jobs.train_adapter.step_inputs`` with SigLIP's image processor), then a device step, one after the
other on one thread (what train-adapter did) and overlapped with the loading on 1..N decoding threads
(``jobs.train_adapter.loaded_steps``, what it does), against the floor max(load, device) measured in the same run.
The device step is a wait of a fixed time: a GPU step leaves the host's cores free, so a sleep, which holds no core
and no GIL, is what it looks like from the host. Writes JSON to benchmarks/results/.

    python benchmarks/bench_loader.py                   # 512 JPEG images of 384 x 384, 1 and 2 decoding threads
    python benchmarks/bench_loader.py --quick           # tiny, for CI
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from actstore.data import ImageTextSource, open_dataset
from bench_store import report_header, save_result
from jobs.train_adapter import loaded_steps, step_inputs


class HostPreprocessor:
    """What ``step_inputs`` needs of a model: its vision tower's image processor, on the host."""

    def __init__(self) -> None:
        from transformers import SiglipImageProcessor

        self.image_processor = SiglipImageProcessor()  # 224 x 224, as SigLIP-so400m-patch14-224; no download

    def host_pixel_values(self, images: list[Any]) -> Any:
        """Preprocessed pixels of ``images``."""
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]


def write_jpeg_parquet(path: Path, n: int, side: int) -> None:
    """``n`` photo-like JPEG images (smooth colour fields with noise, so that decoding costs what a photo's does)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    cells = []
    for i in range(n):
        base = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(4 * (x + y) + 2 * i)], axis=-1)
        pixels = np.clip(127 + 90 * base + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        cells.append({"bytes": buf.getvalue(), "path": None})
    captions = [f"picture {i}" for i in range(n)]
    table = pa.table({"id": [f"img{i}" for i in range(n)], "image": cells, "caption": captions})
    pq.write_table(table, path)


def run_serial(steps: range, load: Any, device_seconds: float) -> float:
    """Seconds for every step: ``load(step)``, then a device step."""
    begun = time.perf_counter()
    for step in steps:
        load(step)
        time.sleep(device_seconds)
    return time.perf_counter() - begun


def run_overlapped(steps: range, loaded: Any, device_seconds: float) -> float:
    """Seconds for every step, each step's inputs from ``loaded`` (loaded while the device step before runs)."""
    begun = time.perf_counter()
    for _ in zip(steps, loaded):
        time.sleep(device_seconds)
    return time.perf_counter() - begun


def main() -> None:
    """Measure and write the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--step-images", type=int, default=32, help="images one rank loads per step")
    parser.add_argument("--device-ms", type=float, default=None,
                        help="a device step's time (default: the measured load time on one thread)")
    parser.add_argument("--loader-threads", default="1,2", help="decoding threads to compare, comma-separated")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.images, args.side, args.micro_batch, args.step_images = 24, 64, 4, 8
    thread_counts = [int(n) for n in args.loader_threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.parquet"
        write_jpeg_parquet(path, args.images, args.side)
        source = ImageTextSource(open_dataset("parquet", str(path)), "image", "caption")
        model = HostPreprocessor()
        steps = range(args.images // args.step_images)

        def indices_of(step: int) -> list[int]:
            return list(range(step * args.step_images, (step + 1) * args.step_images))

        def load(step: int) -> list[Any]:
            return step_inputs(model, source, indices_of(step), args.micro_batch)

        load(0)  # warm: the first read maps the file and builds the processor's caches
        load_seconds = run_serial(steps, load, 0.0) / len(steps)
        device_seconds = load_seconds if args.device_ms is None else args.device_ms / 1e3
        serial = run_serial(steps, load, device_seconds) / len(steps)
        overlapped = {n: run_overlapped(steps, loaded_steps(model, source, steps, indices_of, args.micro_batch, n),
                                        device_seconds) / len(steps) for n in thread_counts}
    report = report_header("loader", args)
    report["seconds_per_step"] = {"load": load_seconds, "device": device_seconds, "serial": serial,
                                  "overlapped_by_threads": {str(n): t for n, t in overlapped.items()}}
    floor = max(load_seconds / max(thread_counts), device_seconds)  # loading can at best split across the threads
    best = min(overlapped.values())
    report["ratios"] = {"best_vs_floor": floor / best, "speedup_vs_serial": serial / best,
                        "by_threads_vs_serial": {str(n): serial / t for n, t in overlapped.items()}}
    print(f"per step: load {load_seconds * 1e3:.1f} ms on one thread, device {device_seconds * 1e3:.1f} ms; serial "
          f"{serial * 1e3:.1f} ms; overlapped " + ", ".join(f"{n} thread(s) {t * 1e3:.1f} ms"
                                                           for n, t in overlapped.items())
          + f"; best = {floor / best:.2f}x the floor, {serial / best:.2f}x serial")
    save_result(report, "loader", args.out)


if __name__ == "__main__":
    main()
