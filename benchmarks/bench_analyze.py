"""Analysis throughput: tokens/s of the Dask analysis over a store, next to the fused kernel alone on chunks already
on the device and the store's read bandwidth through the same Dask graph (decode only), measured in one run.
Writes JSON to benchmarks/results/.

    python benchmarks/bench_analyze.py            # GPU: 256 images x 256 tokens x 4 states, d 2304, bf16, 16k latents
    python benchmarks/bench_analyze.py --quick    # CPU, tiny (CI; the kernel runs in Triton's interpreter)

Goal: analysis tokens/s >= 0.8 x min(kernel-alone tokens/s, read-bound tokens/s). The ratios are given for the bare
statistics and ("-full") for what `actstore analyze` computes, with top-k examples and each image's top latents.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    import xarray as xr

    from actstore.stats import SAEParams

sys.path.insert(0, str(Path(__file__).parent))

from bench_kernels import make_sae, timed  # noqa: E402
from bench_store import GB, activation_like, drop_page_cache, gil_switch_interval, save_result  # noqa: E402


def build_store(path: Path, args: argparse.Namespace) -> dict:
    """A store of residual-like bf16 activations with image and text tokens; returns its info."""
    from actstore.integrity import store_info
    from actstore.schema import StoreSchema
    from actstore.writer import StoreWriter, TextTokens

    schema = StoreSchema(layers=tuple(range(args.layers)), image_tokens=args.tokens, d_model=args.d,
                         capacity=args.images, block_images=args.block_images, text_tokens_per_image=args.text_tokens)
    rng = np.random.default_rng(0)
    with StoreWriter.create(path, schema) as writer:
        for block in range(schema.blocks_for(args.images)):
            n = schema.block_images
            images = activation_like(rng, (args.layers, n, args.tokens, args.d), schema.numpy_dtype)
            m = n * args.text_tokens
            text = TextTokens(resid=activation_like(rng, (args.layers, m, args.d), schema.numpy_dtype),
                              image=np.repeat(np.arange(n), args.text_tokens), position=np.tile(np.arange(m // n), n),
                              token_id=rng.integers(0, 1000, m)) if m else None
            writer.submit_block(block, images, [f"img{block}-{i}" for i in range(n)], None, text)
    return store_info(path)


def sae_suite(ds: xr.Dataset, args: argparse.Namespace) -> dict[int, SAEParams]:
    """One random JumpReLU SAE per state (float32, on the CPU, as a suite loads them), with thresholds set on that
    state's own tokens from every block for a mean L0 of about ``--l0`` (each block has its own outlier dimensions:
    thresholds set on one block's tokens give L0 ~300 on the others, set on four blocks ~150)."""
    from actstore.stats import SAEParams

    suite = {}
    blocks = ds.image_resid.data.numblocks[1]
    for layer in range(args.layers):
        taken = [np.asarray(ds.image_resid.data.blocks[layer, b], dtype=np.float32).reshape(-1, args.d)
                 [: max(64, 4096 // blocks)] for b in range(blocks)]
        sample = torch.from_numpy(np.concatenate(taken))
        w = make_sae(args.d, args.width, args.l0, "cpu", torch.float32, seed=layer, sample=sample)
        suite[layer] = SAEParams(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], "jumprelu", threshold=w["threshold"])
    return suite


def token_count(ds: xr.Dataset) -> int:
    """Tokens the analysis visits: every state's image and text tokens."""
    per_state = ds.sizes["image"] * ds.sizes["image_token"] + ds.sizes.get("text_token", 0)
    return per_state * ds.sizes["layer"]


def read_only(ds: xr.Dataset, scheduler: Any) -> float:
    """Seconds to read and decode every chunk the analysis reads, through the same Dask graph shape (no compute)."""
    import dask

    tasks = []
    for name in ("image_resid", "text_resid"):
        if name in ds:
            tasks += [dask.delayed(np.asarray)(b).shape for b in ds[name].data.to_delayed().reshape(-1)]
    start = time.perf_counter()
    dask.compute(tasks, scheduler=scheduler)
    return time.perf_counter() - start


# How far a run's FVU and L0 (relative) and cosine (absolute: it may be near 0) may be from the plain-torch backend's:
# float32 differs by summation order only (the kernel's products are IEEE, not tf32); bf16 weights round every
# product, so that tokens near a threshold may fire or not.
AGREEMENT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def agreement(got: xr.Dataset, reference: xr.Dataset, weight_dtype: str) -> dict[str, Any]:
    """Worst difference, over states and token kinds, of an analysis' FVU and L0 (relative) and cosine (absolute) from
    the reference backend's on the same tokens, and whether all are within AGREEMENT_TOLERANCE of ``weight_dtype``."""
    def values(ds: xr.Dataset, name: str) -> np.ndarray:
        return ds[name].values.astype(np.float64)

    out: dict[str, Any] = {
        name: float(np.max(np.abs(values(got, name) - values(reference, name))
                           / np.maximum(np.abs(values(reference, name)), 1e-12))) for name in ("fvu", "l0_mean")}
    out["mean_cos"] = float(np.max(np.abs(values(got, "mean_cos") - values(reference, "mean_cos"))))
    out["agrees"] = max(out.values()) <= AGREEMENT_TOLERANCE[weight_dtype]
    return out


def kernel_only(ds: xr.Dataset, saes: dict[int, SAEParams], device: torch.device, repeat: int,
                weight_dtype: str) -> float:
    """Tokens/s of ``kernels.sae_stats`` alone on device-resident chunks of the store's image chunk shape."""
    from actstore.stats import WEIGHT_DTYPES
    from kernels import sae_stats

    shape = ds.image_resid.data.chunksize  # (1, block_images, tokens, d)
    tokens = int(np.prod(shape[:-1]))
    dtype = WEIGHT_DTYPES[weight_dtype]
    chunks = [torch.from_numpy(np.asarray(ds.image_resid.data.blocks[0, i], dtype=np.float32))
              .reshape(tokens, -1).to(device, dtype) for i in range(min(4, ds.image_resid.data.numblocks[1]))]
    sae = saes[0].on(device, dtype)

    def run(x: torch.Tensor) -> None:
        sae_stats(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, activation=sae.activation, threshold=sae.threshold)

    def rotate() -> None:  # among distinct chunks, so the inputs are not served from L2
        for x in chunks:
            run(x)

    seconds, _ = timed(rotate, device.type, warmup=1, repeat=repeat)  # warm-up: compile / autotune
    return tokens * len(chunks) / seconds


def profile_chunk(ds: xr.Dataset, saes: dict[int, SAEParams], device: torch.device) -> list[dict]:
    """The ten costliest operations of one chunk's analysis task (torch.profiler), to see where its time goes."""
    from torch.profiler import ProfilerActivity, profile

    from actstore.stats import chunk_partial

    block = np.asarray(ds.image_resid.data.blocks[0, 0])
    chunk_partial(block, saes[0], 0)  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        chunk_partial(block, saes[0], 0)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "device_ms": getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e3}
            for e in events]


class TaskTimes:
    """Per task name of a local-scheduler Dask computation: how many ran and the seconds they ran, with the
    computation's wall time (a dask callback; the sum over a name divided by the wall is its mean concurrency)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: dict[Any, float] = {}
        self.spans: list[tuple[str, float]] = []
        self.wall = [0.0, 0.0]

    def callback(self) -> Any:
        """The dask.callbacks.Callback that records into this object."""
        from dask.callbacks import Callback
        from dask.utils import key_split

        def start(dsk: Any) -> None:
            self.wall[0] = time.perf_counter()

        def pretask(key: Any, dsk: Any, state: Any) -> None:
            with self.lock:
                self.started[key] = time.perf_counter()

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker: Any) -> None:
            now = time.perf_counter()
            with self.lock:
                self.spans.append((key_split(key), now - self.started.pop(key, now)))

        def finish(dsk: Any, state: Any, errored: bool) -> None:
            self.wall[1] = time.perf_counter()

        return Callback(start=start, pretask=pretask, posttask=posttask, finish=finish)

    def summary(self) -> dict:
        """Per task name: count, total and mean seconds, mean concurrency; and the compute's wall seconds."""
        wall = max(self.wall[1] - self.wall[0], 1e-9)
        out: dict[str, Any] = {"compute_wall_s": wall}
        for name in sorted({n for n, _ in self.spans}):
            times = [t for n, t in self.spans if n == name]
            out[name] = {"count": len(times), "total_s": sum(times), "mean_ms": 1e3 * sum(times) / len(times),
                         "max_ms": 1e3 * max(times), "concurrency": sum(times) / wall}
        return out


@contextmanager
def phase_clock(totals: dict[str, list[float]]) -> Iterator[None]:
    """Host seconds spent in each step of ``chunk_partial`` (summed over threads), by patching actstore.stats'
    names for the duration: the SAE copy lookup, the copy to the device, the kernel call, top-k, the read-back."""
    import actstore.stats as stats

    lock = threading.Lock()

    def clocked(name: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    totals.setdefault(name, []).append(time.perf_counter() - start)
        return run

    names = ("to_device", "sae_stats", "latent_top_k", "image_top_latents", "to_host", "_chunk_sums")
    originals = {name: getattr(stats, name) for name in names}
    on = stats.SAEParams.on
    try:
        for name, fn in originals.items():
            setattr(stats, name, clocked(name, fn))
        stats.SAEParams.on = clocked("SAEParams.on", on)
        yield
    finally:
        for name, fn in originals.items():
            setattr(stats, name, fn)
        stats.SAEParams.on = on


def diagnose(ds: xr.Dataset, saes: dict[int, SAEParams], scheduler: Any, tokens: int, switch_interval: float | None,
             threads: int | None = None, **options: Any) -> dict:
    """One more analysis (not timed for the ratios) with every task and chunk step clocked: where its time goes;
    ``switch_interval`` sets Python's GIL switch interval for it (``sys.setswitchinterval``), ``threads`` the threaded
    scheduler's thread count (default: one per core)."""
    import dask

    from actstore.stats import compute_layer_stats

    tasks, steps = TaskTimes(), {}
    drop_page_cache()
    used_interval = switch_interval or sys.getswitchinterval()
    start = time.perf_counter()
    with gil_switch_interval(switch_interval), tasks.callback(), phase_clock(steps), \
            dask.config.set(num_workers=threads):
        compute_layer_stats(ds, saes, scheduler=scheduler, **options)
    seconds = time.perf_counter() - start
    summary = tasks.summary()
    return {"options": options, "switch_interval": used_interval, "threads": threads or os.cpu_count(),
            "tokens_per_s": tokens / seconds,
            "seconds": seconds,
            "outside_compute_s": seconds - summary["compute_wall_s"], "tasks": summary,
            "chunk_steps": {k: {"count": len(v), "total_s": sum(v), "mean_ms": 1e3 * sum(v) / len(v)}
                            for k, v in steps.items()}}


def beyond_code_buffer(stats: xr.Dataset, tokens_per_task: int) -> dict[str, Any]:
    """Per token kind: the largest L0 seen and the share of tokens whose L0 exceeds the fused kernel's code slots per
    token at this task size (those tokens take the exact, slower fallback in the analyses that keep codes)."""
    from kernels.sae_triton import code_capacity

    cap = code_capacity(tokens_per_task, stats.sizes["latent"])
    out: dict[str, Any] = {"tokens_per_task": tokens_per_task, "slots_per_token": cap}
    for kind in stats.kind.values:
        hist = stats.l0_hist.sel(kind=kind).sum("layer").values
        seen = np.nonzero(hist)[0]
        out[str(kind)] = {"max_l0": int(seen[-1]) if len(seen) else 0,
                          "share_beyond": float(hist[cap + 1:].sum() / max(hist.sum(), 1))}
    return out


def stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a time box's ``timeout``) as an exception: the runs so far and the limits are still reported."""
    raise TimeoutError("stopped by SIGTERM (time box)")


def main() -> None:
    """Run the benchmark and write its JSON."""
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=16, help="text tokens per image")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--l0", type=float, default=100.0)
    parser.add_argument("--block-images", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens-per-task", default="4096,65536", help="other task sizes to diagnose (0: none)")
    parser.add_argument("--switch-interval", type=float, default=0.0005,
                        help="GIL switch interval (s) to diagnose (0: none)")
    parser.add_argument("--threads", type=int, default=2 * (os.cpu_count() or 1),
                        help="threads of the threaded scheduler to diagnose, beside one per core (0: none)")
    parser.add_argument("--scheduler", default="threads", help="'threads' or 'local' (a distributed.LocalCluster)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.images, args.tokens, args.text_tokens, args.layers, args.d, args.width, args.l0 = 8, 8, 2, 2, 32, 96, 6.0
        args.block_images, args.repeat = 4, 1

    import dask

    import actstore
    from actstore.stats import WEIGHT_DTYPES, compute_device, compute_layer_stats, default_tokens_per_task

    device = compute_device()
    directory = Path(tempfile.mkdtemp(prefix="bench-analyze-", dir=args.dir))
    path = directory / "store.zarr"
    try:
        info = build_store(path, args)
        ds = actstore.open(path)
        saes = sae_suite(ds, args)
        tokens = token_count(ds)
        client = None
        scheduler = "threads"
        if args.scheduler == "local":
            from distributed import Client, LocalCluster

            client = Client(LocalCluster(n_workers=1, threads_per_worker=os.cpu_count(), dashboard_address=None))
            scheduler = client
        kernel = {w: kernel_only(ds, saes, device, args.repeat, w) for w in WEIGHT_DTYPES}
        chunk_profile = profile_chunk(ds, saes, device)
        cold = drop_page_cache()
        read_cold = tokens / read_only(ds, scheduler)
        read_warm = tokens / read_only(ds, scheduler)
        analysis, setup, stats, diagnosis, name = {}, {}, None, {}, "setup"
        # The warm-up visits every layer on the first block of images: the once-per-worker costs (each SAE's copy to
        # the device, autotuning) are timed apart from the steady-state rate that a large store runs at.
        first = ds.isel(image=slice(0, args.block_images))
        if "text_token" in ds.dims:
            first = first.isel(text_token=slice(0, args.block_images * args.text_tokens))
        # sync: one thread, for diagnosis; "full": what `actstore analyze` computes (top-k examples, image top latents)
        runs = ([(w, scheduler, {}) for w in WEIGHT_DTYPES] + [("float32", "sync", {})]
                + [(w, scheduler, {"top_k": 8, "image_top": 5}) for w in WEIGHT_DTYPES])
        failure, agreements = None, {}
        try:  # a failing run (a CUDA assert poisons the context) still leaves the limits and earlier runs reported
            # The plain-torch backend on the warm-up's tokens: each run's warm-up result is checked against it, since
            # a rate measured on wrong statistics would mean nothing.
            name = "reference"
            reference = compute_layer_stats(first, saes, backend="reference", scheduler="sync")
            for weight_dtype, sched, extra in runs:
                name = f"{weight_dtype}-{'sync' if sched == 'sync' else args.scheduler}" + ("-full" if extra else "")
                start = time.perf_counter()
                warm = compute_layer_stats(first, saes, scheduler=sched, weight_dtype=weight_dtype, **extra)
                setup[name] = time.perf_counter() - start
                agreements[name] = agreement(warm, reference, weight_dtype)
                drop_page_cache()
                start = time.perf_counter()
                got = compute_layer_stats(ds, saes, scheduler=sched, weight_dtype=weight_dtype, **extra)
                analysis[name] = tokens / (time.perf_counter() - start)
                stats = got if stats is None else stats
                print(f"  analysis {name}: {analysis[name]:.0f} tokens/s", flush=True)
            # Where the time goes, for the bare and the full analysis (local schedulers only: the callback is theirs),
            # with other task sizes, a shorter GIL switch interval and more threads than the defaults (a thread
            # whose task waits for the GPU reads no chunk meanwhile)
            variants = [("", {}, None)] + [(f"-tpt{n}", {"tokens_per_task": n}, None)
                                           for n in map(int, args.tokens_per_task.split(",")) if n]
            if args.switch_interval:
                variants.append((f"-switch{args.switch_interval * 1e3:g}ms", {}, args.switch_interval))
            if args.threads:
                variants.append((f"-threads{args.threads}", {"threads": args.threads}, None))
            for suffix, options, switch in variants if client is None else []:
                for full, extra in (("", {}), ("-full", {"top_k": 8, "image_top": 5})):
                    name = f"bfloat16{full}{suffix}"
                    diagnosis[name] = diagnose(ds, saes, scheduler, tokens, switch, weight_dtype="bfloat16", **extra,
                                               **options)
                    print(f"  diagnosis {name}: {diagnosis[name]['tokens_per_s']:.0f} tokens/s", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON, which is written all the same
            failure = f"{name}: {type(exc).__name__}: {exc}"
            print(f"  FAILED {failure}", flush=True)
        if client is not None:
            client.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    read = read_cold if cold else read_warm
    bytes_per_token = info["bytes_logical"] / max(tokens, 1)
    ratios = {}
    # "-full" is what `actstore analyze` runs (it also keeps top-k examples and each image's top latents), against the
    # same limits: the kernel without codes and the read.
    for weight_dtype in WEIGHT_DTYPES:
        for suffix in ("", "-full"):
            ours = analysis.get(f"{weight_dtype}-{args.scheduler}{suffix}")
            if ours is None:
                continue
            ratios[weight_dtype + suffix] = {
                "analysis_vs_kernel_only": ours / kernel[weight_dtype], "analysis_vs_read": ours / read,
                "analysis_vs_limit": ours / min(kernel[weight_dtype], read)}
    ratios["goal"] = 0.8
    report = {
        "benchmark": "analyze",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "host": platform.node(),
        "config": {**vars(args), "tokens_total": tokens, "codec": info["schema"]["codec"],
                   "dask": dask.__version__, "interpreted": os.environ.get("TRITON_INTERPRET") == "1"},
        "store": {"bytes_logical": info["bytes_logical"], "bytes_stored": info["bytes_stored"],
                  "compression_ratio": info["compression_ratio"]},
        "mean_l0_image": float(stats.l0_mean.sel(kind="image").mean()) if stats is not None else None,
        "l0_beyond_code_buffer": None if stats is None else beyond_code_buffer(
            stats, max(default_tokens_per_task(), args.block_images * args.tokens)),  # a task: at least one chunk
        "failure": failure,
        # worst difference of each run's FVU, L0 (relative) and cosine from the plain-torch backend's, on one block
        "agreement_with_reference": agreements,
        "results_agree": bool(agreements) and all(a["agrees"] for a in agreements.values()),
        "tokens_per_s": {"analysis": analysis, "kernel_only": kernel, "read_cold": read_cold if cold else None,
                         "read_warm": read_warm},
        "read_GBps_logical": {"cold": read_cold * bytes_per_token / GB if cold else None,
                              "warm": read_warm * bytes_per_token / GB},
        "page_cache_dropped": cold,
        "warm_up_seconds": setup,  # every layer on one block of images, first SAE copies and autotuning included
        "chunk_profile": chunk_profile,
        "diagnosis": diagnosis,
        "ratios": ratios,
    }
    shown = ("tokens_per_s", "read_GBps_logical", "ratios", "mean_l0_image", "l0_beyond_code_buffer", "results_agree")
    print(json.dumps({k: report[k] for k in shown}, indent=1))
    tag = "gpu" if device.type == "cuda" else "cpu-quick"
    save_result(report, f"analyze-{tag}", args.out)


if __name__ == "__main__":
    main()
