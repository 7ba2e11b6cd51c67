"""Pure compute for SAE statistics: fused Triton kernels and their plain-torch references (imports torch and
triton only). ``sae_stats`` and ``sae_encode_sparse`` run the Triton path on CUDA tensors (and on the CPU under
``TRITON_INTERPRET=1``), the chunked reference elsewhere."""

from __future__ import annotations

import importlib.metadata
import os
import threading
from contextlib import contextmanager
from typing import Iterator

# Hugging Face's `kernels` (a dependency of transformers >= 5.25, optional before) has the import name of this
# package: whichever comes first on sys.path hides the other, and installing both writes one folder. Failing here
# names the cause; without it, transformers fails later on a missing name (CUDAProperties) or actstore does.
try:
    _hf_kernels = importlib.metadata.version("kernels")
except importlib.metadata.PackageNotFoundError:
    _hf_kernels = None
if _hf_kernels is not None:
    raise ImportError(
        f"Hugging Face's `kernels` {_hf_kernels} is installed in this environment, and its import name is that of "
        f"actstore's Triton package `kernels` ({os.path.dirname(__file__)}): one hides the other, so transformers or "
        "actstore fails to import. Use an environment without it (`pip uninstall kernels`) and transformers < 5.25, "
        "which does not need it (as pyproject.toml pins).")

import torch  # noqa: E402  (after the check: a clash fails before paying for torch's import)

from kernels.reference import (  # noqa: E402
    SAEStats,
    SparseCodes,
    sae_encode_sparse_reference,
    sae_stats_reference,
)

BACKENDS = ("auto", "triton", "reference")
# Triton's interpreter patches triton.language globally while a kernel runs, so interpreted kernels must not run in
# two threads at once (Dask's threaded scheduler would). Compiled kernels may, once tuned: Triton's autotuner is not
# thread-safe (triton-lang/triton#11494: concurrent first calls of one kernel crash, or time their configs against
# each other), so the first call of each kernel variant (entry point, flags, SAE shape, dtypes) runs alone.
_INTERPRETER_LOCK = threading.Lock()
_TUNING_LOCK = threading.Lock()
_TUNED: set[tuple] = set()


@contextmanager
def _triton_guard(*variant: object) -> Iterator[None]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        with _INTERPRETER_LOCK:
            yield
        return
    key = tuple(str(v) if isinstance(v, (torch.device, torch.dtype)) else v for v in variant)
    if key in _TUNED:
        yield
        return
    with _TUNING_LOCK:
        yield
        _TUNED.add(key)


def scatter_kept(size: int, keep: torch.Tensor, positions: torch.Tensor, values: torch.Tensor,
                 fill: float | int | None = None) -> torch.Tensor:
    """A ``size``-long tensor holding ``values[keep]`` at ``positions[keep]`` (``fill`` elsewhere; uninitialised
    where None), without selecting by ``keep``: a boolean selection reads its count back from the device, a wait.

    Every value is copied; those not kept go to one spare entry past the end, which is dropped (it alone receives
    several values). ``positions`` of kept values must be distinct."""
    out = torch.empty(size + 1, dtype=values.dtype, device=values.device) if fill is None else \
        torch.full((size + 1,), fill, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, torch.where(keep, positions, size).flatten(), values.flatten())[:size]


def wait_for_stream(device: torch.device) -> None:
    """Block, without spinning, until the calling thread's current stream of ``device`` has run what is queued
    (nothing to wait for off a GPU).

    CUDA waits by spinning a core (its default with fewer GPU contexts than cores), and the threads that share a GPU
    here need those cores: Dask's threads decode their next chunks while others wait for their kernels, and the
    harvester's writer threads encode while waiting for copies."""
    if device.type == "cuda":
        done = torch.cuda.Event(blocking=True)
        done.record(torch.cuda.current_stream(device))
        done.synchronize()


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return backend == "triton"


def sae_stats(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
    activation: str, threshold: torch.Tensor | None = None, k: int | None = None,
    apply_b_dec_to_input: bool = False, feature_stats: bool = True, return_codes: bool = False,
    backend: str = "auto",
) -> SAEStats:
    """Per-token reconstruction error terms and L0, and per-latent firing statistics (see kernels.reference); with
    ``return_codes``, each token's active latents too, from the same encode."""
    kwargs = dict(activation=activation, threshold=threshold, k=k, apply_b_dec_to_input=apply_b_dec_to_input,
                  feature_stats=feature_stats, return_codes=return_codes)
    if _use_triton(x, backend):
        from kernels.sae_triton import sae_stats_triton

        with _triton_guard("stats", activation, feature_stats, x.device, x.dtype, W_enc.dtype, W_dec.dtype,
                           tuple(W_enc.shape)):
            return sae_stats_triton(x, W_enc, b_enc, W_dec, b_dec, **kwargs)
    return sae_stats_reference(x, W_enc, b_enc, W_dec, b_dec, **kwargs)


def sae_encode_sparse(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, *, activation: str,
    threshold: torch.Tensor | None = None, k: int | None = None, apply_b_dec_to_input: bool = False,
    b_dec: torch.Tensor | None = None, backend: str = "auto",
) -> SparseCodes:
    """Each token's active latents and activations, in CSR form (see kernels.reference.SparseCodes)."""
    kwargs = dict(activation=activation, threshold=threshold, k=k, apply_b_dec_to_input=apply_b_dec_to_input,
                  b_dec=b_dec)
    if _use_triton(x, backend):
        from kernels.sae_triton import sae_encode_sparse_triton

        with _triton_guard("encode", activation, x.device, x.dtype, W_enc.dtype, tuple(W_enc.shape)):
            return sae_encode_sparse_triton(x, W_enc, b_enc, **kwargs)
    return sae_encode_sparse_reference(x, W_enc, b_enc, **kwargs)


__all__ = ["SAEStats", "SparseCodes", "sae_encode_sparse", "sae_stats", "wait_for_stream", "BACKENDS"]
