"""SAE statistics throughput: ours (fused Triton) vs sae-lens, the eager and compiled dense baselines, our chunked
reference, and the encode GEMM alone (the floor), all in one run. Writes JSON to benchmarks/results/.

    python benchmarks/bench_kernels.py            # on a GPU: Gemma Scope shapes, d=2304, F=16k/64k/128k, N=64k, bf16
    python benchmarks/bench_kernels.py --quick    # CPU, tiny shapes (CI; 'ours' runs in Triton's interpreter)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime, timezone
from typing import Any, Callable

import torch


def dense_chunk(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What peers do per batch: dense z, dense decode, then error and L0 (the eager / compiled baseline)."""
    pre = x @ W_enc + b_enc
    z = pre.relu() * (pre > threshold)
    x_hat = z @ W_dec + b_dec
    return (x.float() - x_hat.float()).square().sum(-1), (z > 0).sum(-1)


def chunked(fn: Callable, x: torch.Tensor, rows: int) -> Callable[[], None]:
    """Run ``fn`` over ``x`` in chunks of ``rows`` tokens (what fits for the dense baselines)."""
    def run() -> None:
        for start in range(0, x.shape[0], rows):
            fn(x[start : start + rows])
    return run


def timed(fn: Callable[[], object], device: str, warmup: int, repeat: int) -> tuple[float, float | None]:
    """Median seconds of ``fn`` and its peak extra device memory in bytes (None on the CPU)."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return statistics.median(times), peak


def make_sae(d: int, F: int, target_l0: float, device: str, dtype: torch.dtype, seed: int = 0,
             sample: torch.Tensor | None = None) -> dict:
    """Random SAE whose per-latent thresholds give a mean L0 of about ``target_l0`` on ``sample`` (default Gaussian)."""
    g = torch.Generator(device=device).manual_seed(seed)
    W_enc = torch.randn(d, F, device=device, generator=g) / d**0.5
    if sample is None:
        sample = torch.randn(4096, d, device=device, generator=g)
    b_enc = torch.zeros(F, device=device)
    # kthvalue, not torch.quantile: quantile refuses inputs of more than 2^24 elements (4096 x 16k already is).
    pre = sample.to(device=device, dtype=torch.float32) @ W_enc
    rank = min(len(pre) - 1, max(1, round(len(pre) * (1 - target_l0 / F))))
    # Midway between two neighbouring sample values, so that no sample token sits on a threshold, where float
    # rounding alone would decide whether it fires (bench_analyze checks its results against the reference backend).
    threshold = ((torch.kthvalue(pre, rank, dim=0).values + torch.kthvalue(pre, rank + 1, dim=0).values) / 2
                 ).clamp(min=1e-3)
    W_dec = torch.randn(F, d, device=device, generator=g) / F**0.5
    return {"W_enc": W_enc.to(dtype), "b_enc": b_enc, "W_dec": W_dec.to(dtype), "b_dec": torch.zeros(d, device=device),
            "threshold": threshold}


def agreement(ours: Any, reference: Any) -> dict[str, float]:
    """How our kernel's statistics of the same tokens compare with the plain-torch reference's: the share of tokens
    with the same L0, the worst relative difference of a token's squared error, and of a latent's firing count."""
    sq_err = (ours.sq_err.double() - reference.sq_err.double()).abs() / reference.sq_err.double().abs().clamp(min=1e-12)
    fires = (ours.fire_count.double() - reference.fire_count.double()).abs().max() / reference.fire_count.double().max()
    return {"tokens_with_equal_l0": float((ours.l0 == reference.l0).double().mean()),
            "sq_err_max_rel": float(sq_err.max()), "fire_count_max_rel": float(fires)}


def bench_shape(N: int, d: int, F: int, target_l0: float, device: str, dtype: torch.dtype,
                args: argparse.Namespace) -> dict:
    """Every contender at one shape."""
    from kernels import sae_stats
    from kernels.reference import sae_stats_reference

    sae = make_sae(d, F, target_l0, device, dtype)
    x = torch.randn(N, d, device=device, dtype=dtype)
    thr = sae["threshold"]
    args_dense = (sae["W_enc"], sae["b_enc"].to(dtype), sae["W_dec"], sae["b_dec"].to(dtype), thr.to(dtype))
    dense_rows = max(1, min(N, (1 << 28) // F))  # dense z of at most 2^28 elements (512 MiB in bf16)
    contenders: dict[str, Callable[[], object]] = {
        "encode_gemm_only": lambda: x @ sae["W_enc"],
        "ours": lambda: sae_stats(x, sae["W_enc"], sae["b_enc"], sae["W_dec"], sae["b_dec"], activation="jumprelu",
                                  threshold=thr, backend="triton"),
        "reference": lambda: sae_stats_reference(x, sae["W_enc"], sae["b_enc"], sae["W_dec"], sae["b_dec"],
                                                 activation="jumprelu", threshold=thr),
        "dense_eager": chunked(lambda xs: dense_chunk(xs, *args_dense), x, dense_rows),
    }
    if not args.skip_compile:
        compiled = torch.compile(dense_chunk)
        contenders["dense_compiled"] = chunked(lambda xs: compiled(xs, *args_dense), x, dense_rows)
    try:
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

        peer = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=F, dtype=str(dtype).split(".")[1], device=device,
                                             apply_b_dec_to_input=False))
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
                getattr(peer, name).copy_(sae[name])

        def sae_lens_chunk(xs: torch.Tensor) -> object:
            with torch.no_grad():
                z = peer.encode(xs)
                x_hat = peer.decode(z)
                return (xs.float() - x_hat.float()).square().sum(-1), (z > 0).sum(-1)

        contenders["sae_lens"] = chunked(sae_lens_chunk, x, dense_rows)
    except ImportError:
        pass

    reference = sae_stats_reference(x[:2048], sae["W_enc"], sae["b_enc"], sae["W_dec"], sae["b_dec"],
                                    activation="jumprelu", threshold=thr)
    checked = sae_stats(x[:2048], sae["W_enc"], sae["b_enc"], sae["W_dec"], sae["b_dec"], activation="jumprelu",
                        threshold=thr, backend="triton")
    encode_flops = 2 * N * d * F
    result = {"N": N, "d": d, "F": F, "mean_l0": float(reference.l0.float().mean()),
              "agreement": agreement(checked, reference), "contenders": {}}
    for name, fn in contenders.items():
        seconds, peak = timed(fn, device, args.warmup, args.repeat)
        result["contenders"][name] = {
            "seconds": seconds, "tokens_per_s": N / seconds, "encode_TFLOPps": encode_flops / seconds / 1e12,
            "peak_extra_bytes": peak,
        }
        print(f"  F={F:6d} {name:17s} {N / seconds / 1e6:8.3f} M tokens/s  {encode_flops / seconds / 1e12:7.1f} TFLOP/s"
              + (f"  peak +{peak / 2**20:.0f} MiB" if peak is not None else ""))
    c = result["contenders"]
    ratios = {f"ours_vs_{k}": c[k]["seconds"] / c["ours"]["seconds"] for k in c if k != "ours"}
    result["ratios"] = ratios  # > 1: ours is faster; vs encode_gemm_only: the share of the floor we reach
    print("  " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return result


def main() -> None:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1 << 16)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--widths", default="16384,65536,131072")
    parser.add_argument("--l0", type=float, default=100.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.tokens, args.d, args.widths, args.l0, args.warmup, args.repeat = 64, 48, "160", 8.0, 0, 1
        args.skip_compile = True
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    results = [bench_shape(args.tokens, args.d, int(F), args.l0, device, dtype, args) for F in args.widths.split(",")]
    report = {
        "benchmark": "kernels",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dtype": str(dtype),
        "versions": {"torch": torch.__version__},
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "results": results,
    }
    try:
        import triton

        report["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    tag = "gpu" if device == "cuda" else "cpu-quick"
    from bench_store import save_result  # the results helper; imported here so make_sae/timed stay import-light

    save_result(report, f"kernels-{tag}", args.out)


if __name__ == "__main__":
    main()
