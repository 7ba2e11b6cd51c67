"""Dataset-wide SAE statistics per layer and token kind, out of core with Dask.

Each task reads one stored chunk (one layer x a block of images, or a block's text tokens), runs the layer's SAE
through the fused kernel, and returns a :class:`Partial` of float64 sums. Partials merge exactly and associatively
(Chan et al. for the mean-centred sum of squares), so the result does not depend on chunking or on the number of
workers, and memory stays bounded by a few chunks per worker whatever the store's size.

Definitions over the N tokens of a (layer, kind):
    FVU            = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2   (mean over the whole set, per dimension)
    mean rel. err. = mean_t ||x_t - x_hat_t|| / ||x_t||
    mean cosine    = mean_t  x_t . x_hat_t / (||x_t|| ||x_hat_t||)
    L0             = number of active latents per token: mean, histogram, quantiles
    firing freq.   = fraction of tokens on which a latent is active
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import dask
import numpy as np
import torch
import xarray as xr
import zarr
from zarr.core.sync import sync

from actstore.bfloat16 import to_torch
from actstore.devices import thread_stream, to_device, to_host
from actstore.errors import IncompleteAnalysisError
from actstore.location import list_keys, local_path, open_zarr_store
from actstore.progress import TaskProgress, wait_with_progress
from actstore.schema import ANALYSIS, ANALYSIS_PARTIAL, ANALYSIS_SAVED_MARK
from actstore.sink import fsync_path, sync_tree
from kernels import sae_stats, scatter_kept, wait_for_stream

KINDS = ("image", "text")


@dataclass
class SAEParams:
    """An SAE's weights and activation, as the kernels take them (float32 tensors on the CPU)."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    activation: str
    threshold: torch.Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = False

    def to(self, device: torch.device, weight_dtype: torch.dtype = torch.float32) -> "SAEParams":
        """A copy on ``device`` with W_enc and W_dec in ``weight_dtype`` (biases and thresholds stay float32)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SAEParams(self.W_enc.to(device, weight_dtype), move(self.b_enc), self.W_dec.to(device, weight_dtype),
                         move(self.b_dec), self.activation, move(self.threshold), self.k, self.apply_b_dec_to_input)

    def on(self, device: torch.device, weight_dtype: torch.dtype = torch.float32) -> "SAEParams":
        """These weights on ``device`` in ``weight_dtype``, from this process's cache (see :class:`DeviceCopies`)."""
        if device.type == "cpu" and weight_dtype == self.W_enc.dtype:
            return self
        return DEVICE_COPIES.get(self, device, weight_dtype)

    def digest(self) -> str:
        """A short hash of the weights: every bias and threshold, and a strided sample of both matrices (hashing
        all of a wide SAE's matrices would take seconds per layer; a retrained SAE differs everywhere)."""
        h = hashlib.sha256(f"{self.activation}|{self.k}|{self.apply_b_dec_to_input}|{tuple(self.W_enc.shape)}".encode())
        for t in (self.b_enc, self.b_dec, self.threshold, self.W_enc.reshape(-1)[::997], self.W_dec.reshape(-1)[::997]):
            if t is not None:
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def nbytes(self) -> int:
        """Bytes of all its tensors."""
        tensors = (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def d_in(self) -> int:
        """Input width."""
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return self.W_enc.shape[1]

    @classmethod
    def from_sae_lens(cls, sae: Any) -> "SAEParams":
        """From a sae-lens SAE (StandardSAE, JumpReLUSAE, TopKSAE, or their training forms); refuses the ones the
        fused kernel would compute wrongly (another architecture, input normalisation, hook_z reshaping)."""
        architecture = sae.cfg.architecture()
        activation = SAE_LENS_ACTIVATIONS.get(architecture)
        if activation is None:
            raise ValueError(f"{type(sae).__name__} (architecture {architecture!r}) is not an SAE the fused kernel "
                             f"computes; it computes {sorted(SAE_LENS_ACTIVATIONS)} SAEs")
        normalisation = getattr(sae.cfg, "normalize_activations", "none")
        if normalisation != "none":
            hint = (" (fold its scaling factor into the weights first: sae.fold_activation_norm_scaling_factor(f))"
                    if normalisation == "expected_average_only_in" else "")
            raise ValueError(f"{type(sae).__name__} normalises its input ({normalisation!r}), which the fused kernel "
                             f"does not; only SAEs with normalize_activations='none' can be analysed{hint}")
        if getattr(sae.cfg, "reshape_activations", "none") != "none":
            raise ValueError(f"{type(sae).__name__} reshapes its input ({sae.cfg.reshape_activations!r}); actstore "
                             "stores the residual stream only")
        detach = lambda t: t.detach().float().cpu().contiguous()  # noqa: E731
        W_enc, b_enc, W_dec = detach(sae.W_enc), detach(sae.b_enc), detach(sae.W_dec)
        if activation == "topk" and getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            # sae-lens ranks pre-activations times each latent's decoder norm and decodes acts / norm: the same SAE
            # with the norms folded into the weights, whose codes are sae-lens' own feature activations
            norm = W_dec.norm(dim=-1)
            W_enc, b_enc = W_enc * norm, b_enc * norm
            W_dec = W_dec / torch.where(norm > 0, norm, 1.0)[:, None]  # an all-zero row stays zero
        return cls(
            W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=detach(sae.b_dec), activation=activation,
            threshold=detach(sae.threshold) if activation == "jumprelu" else None,
            k=getattr(sae.cfg, "k", None), apply_b_dec_to_input=bool(sae.cfg.apply_b_dec_to_input),
        )


# sae-lens architectures (``cfg.architecture()``) whose encode is one the fused kernel computes, and that activation
SAE_LENS_ACTIVATIONS = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}


class DeviceCopies:
    """This process's copies of SAEs on devices: each SAE is copied to a worker's GPU once, not once per chunk, and
    the least recently used copies are dropped once a device's copies would pass ``budget(device)`` bytes, so that
    an analysis of 26 layers of wide SAEs does not hold all 26 on one GPU.

    Copies are made under one lock: a worker's threads start a layer's chunks together and must wait for one copy
    instead of each making its own. A task still using a dropped copy keeps it alive until it finishes, and a task
    finishes only after its stream's work (which reads the copy) is done, so freeing never races a kernel."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[weakref.ref, SAEParams, int]] = OrderedDict()

    @staticmethod
    def budget(device: torch.device) -> int:
        """Bytes of SAE copies a device may hold: ``ACTSTORE_SAE_COPY_BYTES`` if set, else half a GPU's memory."""
        if "ACTSTORE_SAE_COPY_BYTES" in os.environ:
            return int(os.environ["ACTSTORE_SAE_COPY_BYTES"])
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory // 2
        return sys.maxsize

    def get(self, sae: SAEParams, device: torch.device, weight_dtype: torch.dtype) -> SAEParams:
        """The copy of ``sae`` on ``device`` in ``weight_dtype``, made now if this process has none."""
        key = (id(sae), str(device), weight_dtype)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is sae:
                self._entries.move_to_end(key)
                return entry[1]
            need = sae.W_enc.numel() * 2 * torch.finfo(weight_dtype).bits // 8
            self._drop(str(device), self.budget(device) - need)
            copy = sae.to(device, weight_dtype)
            if device.type == "cuda":  # the copy was queued on this thread's stream; the others read it on theirs
                wait_for_stream(device)
            self._entries[key] = (weakref.ref(sae), copy, copy.nbytes)
            return copy

    def held(self, device: torch.device) -> int:
        """Bytes of copies now cached for ``device``."""
        with self._lock:
            return sum(size for (_, dev, _), (_, _, size) in self._entries.items() if dev == str(device))

    def _drop(self, device: str, keep_at_most: int) -> None:
        for key in [k for k, (owner, _, _) in self._entries.items() if owner() is None]:
            del self._entries[key]  # copies of SAEs that no longer exist (their id may be reused)
        mine = [k for k in self._entries if k[1] == device]
        held = sum(self._entries[k][2] for k in mine)
        for key in mine:  # oldest first
            if held <= keep_at_most:
                break
            held -= self._entries.pop(key)[2]


DEVICE_COPIES = DeviceCopies()


@dataclass
class Partial:
    """Sums over a set of tokens that merge exactly (float64; counts int64)."""

    n: int
    mean: np.ndarray  # (d,) mean of x
    m2: float  # sum_t ||x_t - mean||^2
    sq_err: float
    rel_err: float
    cos: float
    l0_hist: np.ndarray  # (d_sae + 1,) tokens per L0 value
    fire: np.ndarray  # (d_sae,) tokens on which each latent fires
    act_sum: np.ndarray  # (d_sae,)
    act_max: np.ndarray  # (d_sae,) float64
    act_argmax: np.ndarray  # (d_sae,) global token index, -1 if never fired
    top_act: np.ndarray  # (d_sae, k) the k largest activations of each latent, descending (0 where fewer fired)
    top_token: np.ndarray  # (d_sae, k) their global token indices (-1 where fewer fired)
    image_top: np.ndarray  # (images, m) each image's m most active latents, in image order (image chunks only)

    def merge(self, other: "Partial") -> "Partial":
        """The partial of the union of both token sets."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        better = other.act_max > self.act_max  # ties keep the earlier token (self covers earlier tokens)
        return Partial(
            n=n, mean=self.mean + delta * (other.n / n),
            m2=self.m2 + other.m2 + float(delta @ delta) * self.n * other.n / n,
            sq_err=self.sq_err + other.sq_err, rel_err=self.rel_err + other.rel_err, cos=self.cos + other.cos,
            l0_hist=self.l0_hist + other.l0_hist, fire=self.fire + other.fire, act_sum=self.act_sum + other.act_sum,
            act_max=np.where(better, other.act_max, self.act_max),
            act_argmax=np.where(better, other.act_argmax, self.act_argmax),
            **dict(zip(("top_act", "top_token"), merge_top_k(self.top_act, self.top_token, other.top_act,
                                                            other.top_token))),
            image_top=np.concatenate([self.image_top, other.image_top]),  # self holds the earlier images
        )


def merge_top_k(act_a: np.ndarray, token_a: np.ndarray, act_b: np.ndarray, token_b: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, the k largest of both lists (ties: the smaller token index first, so merging is deterministic)."""
    # One lexsort of the union: a merge of the two ranked lists by k x k comparisons ran 3-4x slower in numpy (dev VM,
    # 16384 latents, k 8 and 32).
    k = act_a.shape[1]
    act, token = np.concatenate([act_a, act_b], 1), np.concatenate([token_a, token_b], 1)
    empty = token < 0
    order = np.lexsort((np.where(empty, np.iinfo(np.int64).max, token), -act), axis=-1)[:, :k]
    return np.take_along_axis(act, order, 1), np.take_along_axis(token, order, 1)


def code_tokens(codes: Any) -> torch.Tensor:
    """The chunk-local token index of every entry of CSR sparse codes (the row each entry belongs to)."""
    counts = codes.indptr.diff()
    # With its output size given, repeat_interleave needs no read-back of the counts' sum from the device.
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts,
                                   output_size=len(codes.indices))


def latent_top_k(codes: Any, first_token: int, d_sae: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent, its k largest activations in a chunk's sparse codes (float64) and their global token indices
    (-1 where fewer fired), on the codes' device."""
    device = codes.values.device
    token = code_tokens(codes) + first_token
    latent, act = codes.indices.long(), codes.values.float()
    # One sort, by latent and then activation descending: codes are active latents, so activations are positive
    # float32, whose bit patterns order as int32 like the values. Stable: ties keep token order.
    descending = 0x7FFFFFFF - act.view(torch.int32).long()
    order = torch.sort((latent << 31) | descending, stable=True).indices
    latent, act, token = latent[order], act[order].double(), token[order]
    rank = torch.arange(len(latent), device=device) - torch.searchsorted(latent, latent)
    keep, slot = rank < k, latent * k + rank
    return (scatter_kept(d_sae * k, keep, slot, act, 0.0).view(d_sae, k),
            scatter_kept(d_sae * k, keep, slot, token, -1).view(d_sae, k))


def image_top_latents(codes: Any, n_tokens: int, d_sae: int, m: int) -> torch.Tensor:
    """For each image of a chunk (``n_tokens`` consecutive tokens each): its ``m`` latents of largest activation
    summed over its tokens, descending (-1 where fewer fire), on the codes' device. Holds images x latents, never
    tokens x latents."""
    device = codes.values.device
    n_images = (len(codes.indptr) - 1) // n_tokens
    image = code_tokens(codes) // n_tokens
    mass = torch.zeros(n_images * d_sae, dtype=torch.float64, device=device)
    mass.index_add_(0, image * d_sae + codes.indices.long(), codes.values.double())
    values, latents = mass.reshape(n_images, d_sae).topk(min(m, d_sae), dim=1)
    return torch.where(values > 0, latents, -1).to(torch.int32)


def compute_device(backend: str = "auto") -> torch.device:
    """Where a worker runs its chunks: its GPU when it has one (and the backend is not the CPU reference)."""
    return torch.device("cuda") if backend != "reference" and torch.cuda.is_available() else torch.device("cpu")


WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Tokens one analysis task runs on a GPU at once (several stored chunks where chunks are smaller). Each task costs ~60
# small device launches and read-backs, each a hand-off of the GIL among Dask's threads: on the H100 host a 4096-token
# task took ~170 ms for ~10 ms of kernels, and 16384-token tasks raised the bf16 analysis from 130k to 276k tokens/s
# (benchmarks/results/analyze-gpu-h100-2026-11-24-*). The code buffer per token shrinks as tasks grow (1024 latents at
# 16384 tokens; denser tokens take the exact fallback). On a CPU worker grouping saves nothing and holds more memory,
# so there a task is one stored chunk.
TOKENS_PER_TASK = 16384


def sees_gpu() -> bool:
    """Whether this process (a Dask worker, when a cluster runs it) has a GPU to compute on."""
    return torch.cuda.is_available()


def default_tokens_per_task(backend: str = "auto", scheduler: Any = None) -> int:
    """Tokens per analysis task: ``TOKENS_PER_TASK`` where the tasks run on a GPU, else 1 (one chunk). Where they run:
    for a ``distributed.Client``, on its workers (dask-cuda's, say, while this process has no GPU); else here."""
    if backend == "reference":
        return 1
    if hasattr(scheduler, "run"):  # a distributed.Client: ask the workers, which are what run the tasks
        return TOKENS_PER_TASK if any(scheduler.run(sees_gpu).values()) else 1
    return TOKENS_PER_TASK if compute_device(backend).type == "cuda" else 1


def chunk_partial(x: np.ndarray | Sequence[np.ndarray], sae: SAEParams, first_token: int, backend: str = "auto",
                  weight_dtype: str = "float32", top_k: int = 0, image_top: int = 0) -> Partial:
    """The partial of one chunk of tokens ``x`` (..., d), or of consecutive chunks given as a list, whose first token
    has global index ``first_token``.

    ``top_k`` keeps each latent's k most activating tokens; ``image_top`` (for an image chunk (1, images, tokens,
    d)) each image's most active latents. Both come from the codes of the statistics' own encode.

    ``weight_dtype="bfloat16"`` runs the SAE's matrix products on bf16 tensor cores (the whole kernel about 2x the
    float32 rate on an H100) with bf16-rounded weights; float32 (the default) is exact to the SAE's own arithmetic."""
    chunks = [np.asarray(c) for c in x] if isinstance(x, (list, tuple)) else [np.asarray(x)]
    n_image_tokens = chunks[0].shape[-2] if chunks[0].ndim > 2 else 1
    chunks = [c.reshape(-1, c.shape[-1]) for c in chunks]
    device = compute_device(backend)
    with thread_stream(device):
        # Held until the wait below: a copy dropped from the cache meanwhile must outlive the kernels that read it.
        weights = sae.on(device, WEIGHT_DTYPES[weight_dtype])
        sums = _chunk_sums(chunks, weights, first_token, device, backend, top_k, image_top, n_image_tokens)
        host = dict(zip(sums, to_host(list(sums.values()))))  # one wait for the device per task
    empty_top = (np.zeros((sae.d_sae, 0)), np.zeros((sae.d_sae, 0), dtype=np.int64))
    return Partial(
        n=sum(len(c) for c in chunks), mean=host["mean"], m2=float(host["m2"]), sq_err=float(host["sq_err"]),
        rel_err=float(host["rel_err"]), cos=float(host["cos"]), l0_hist=host["l0_hist"], fire=host["fire"],
        act_sum=host["act_sum"], act_max=host["act_max"], act_argmax=host["act_argmax"],
        top_act=host.get("top_act", empty_top[0]), top_token=host.get("top_token", empty_top[1]),
        image_top=host.get("image_top", np.zeros((0, image_top), dtype=np.int32)),
    )


def _chunk_sums(chunks: list[np.ndarray], sae: SAEParams, first_token: int, device: torch.device, backend: str,
                top_k: int, image_top: int, n_image_tokens: int) -> dict[str, torch.Tensor]:
    """Consecutive chunks' partial sums (tokens x d each) as tensors on ``device`` (queued there, not yet waited
    for), in the partial's dtypes."""
    # The chunks cross to the GPU in their stored dtype (half the bytes of float32 for bf16), and every per-token
    # reduction runs there: on a GPU worker the host only decompresses.
    parts = [to_device(to_torch(np.ascontiguousarray(c)), device) for c in chunks]
    xt = parts[0] if len(parts) == 1 else torch.cat(parts)
    x_in = xt.to(sae.W_enc.dtype)  # the kernel uses tensor cores when x and W share a 16-bit dtype
    s = sae_stats(x_in, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, activation=sae.activation,
                  threshold=sae.threshold, k=sae.k, apply_b_dec_to_input=sae.apply_b_dec_to_input,
                  return_codes=bool(top_k or image_top), backend=backend)
    # A copy of its own, centred in place for m2: on a CPU worker each tokens x d float64 temporary is a fresh
    # mmap (Dask's nanny sets MALLOC_TRIM_THRESHOLD_), its page faults a third of a small SAE's chunk time.
    x64 = xt.to(torch.float64, copy=True)
    mean = x64.mean(0) if len(x64) else torch.zeros(xt.shape[1], dtype=torch.float64, device=device)
    x_norm, xhat_norm, err_norm = s.x_sq.double().sqrt(), s.xhat_sq.double().sqrt(), s.sq_err.double().sqrt()
    rel = torch.where(x_norm > 0, err_norm / x_norm, 0.0)
    cos = torch.where((x_norm > 0) & (xhat_norm > 0), s.x_dot_xhat.double() / (x_norm * xhat_norm), 0.0)
    fired = s.act_argmax >= 0
    # Not torch.bincount: on a GPU it reads the largest value back to size its output, a wait for the device.
    l0_hist = torch.zeros(sae.d_sae + 1, dtype=torch.int64, device=device)
    l0_hist.index_add_(0, s.l0.long(), torch.ones_like(s.l0, dtype=torch.int64))
    sums = {
        "mean": mean, "m2": x64.sub_(mean).square_().sum(), "sq_err": s.sq_err.double().sum(), "rel_err": rel.sum(),
        "cos": cos.sum(), "l0_hist": l0_hist,
        "fire": s.fire_count.long(), "act_sum": s.act_sum.double(), "act_max": s.act_max.double(),
        "act_argmax": torch.where(fired, s.act_argmax + first_token, -1).long(),
    }
    if top_k:
        sums["top_act"], sums["top_token"] = latent_top_k(s.codes, first_token, sae.d_sae, top_k)
    if image_top:
        sums["image_top"] = image_top_latents(s.codes, n_image_tokens, sae.d_sae, image_top)
    return sums


def merge_tree(parts: list[Any]) -> Any:
    """Pairwise tree of delayed merges (keeps the graph shallow and the order fixed)."""
    if not parts:
        raise ValueError("no chunks to reduce")
    while len(parts) > 1:
        parts = [dask.delayed(Partial.merge)(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


def layer_partials(ds: xr.Dataset, layer: int, sae: Any, backend: str = "auto",
                   weight_dtype: str = "float32", top_k: int = 0, image_top: int = 0,
                   tokens_per_task: int = 1) -> dict[str, Any]:
    """Delayed partials of one layer, per token kind, one task per run of consecutive stored chunks that together
    hold about ``tokens_per_task`` tokens (at least one chunk)."""
    out = {}
    for kind, name in (("image", "image_resid"), ("text", "text_resid")):
        if name not in ds:
            continue
        data = ds[name].sel(layer=layer).data  # (images, tokens, d) or (text_tokens, d)
        tokens_per_row = int(np.prod(data.shape[1:-1])) if data.ndim > 2 else 1
        blocks = list(data.to_delayed().reshape(-1))
        starts = np.cumsum((0,) + data.chunks[0])[:-1]
        per_task = max(1, tokens_per_task // max(1, max(data.chunks[0]) * tokens_per_row))
        per_image = image_top if kind == "image" else 0
        parts = [dask.delayed(chunk_partial)(blocks[i:i + per_task], sae, int(starts[i]) * tokens_per_row, backend,
                                             weight_dtype, top_k, per_image) for i in range(0, len(blocks), per_task)]
        out[kind] = merge_tree(parts)
    return out


def finalize(p: Partial) -> dict[str, Any]:
    """Ratios and distributions from a merged partial."""
    n = max(p.n, 1)
    levels = np.arange(len(p.l0_hist))
    cdf = np.cumsum(p.l0_hist) / n
    quantile = lambda q: float(levels[min(np.searchsorted(cdf, q), len(levels) - 1)])  # noqa: E731
    return {
        "n_tokens": p.n, "fvu": p.sq_err / p.m2 if p.m2 > 0 else np.nan, "mse": p.sq_err / n,
        "mean_rel_err": p.rel_err / n, "mean_cos": p.cos / n, "l0_mean": float(levels @ p.l0_hist) / n,
        "l0_q10": quantile(0.1), "l0_median": quantile(0.5), "l0_q90": quantile(0.9),
        "l0_hist": p.l0_hist, "fire_freq": p.fire / n, "fire_count": p.fire,
        "act_mean": np.divide(p.act_sum, p.fire, out=np.zeros_like(p.act_sum), where=p.fire > 0),
        "act_max": p.act_max, "act_argmax": p.act_argmax, "top_act": p.top_act, "top_token": p.top_token,
        "image_top": p.image_top,
    }


def compute_with_progress(tasks: list[Any], scheduler: Any, progress: bool) -> list[Any]:
    """Compute delayed objects; with ``progress``, under a progress display (a bar on a terminal, lines in a log):
    :func:`actstore.progress.wait_with_progress` for a cluster client, :class:`actstore.progress.TaskProgress` for
    the local schedulers."""
    if progress and hasattr(scheduler, "gather"):  # a distributed.Client
        futures = scheduler.compute(tasks)
        wait_with_progress(futures, "statistics")
        return scheduler.gather(futures)
    if progress:
        with TaskProgress("statistics"):
            return list(dask.compute(*tasks, scheduler=scheduler))
    return list(dask.compute(*tasks, scheduler=scheduler))


def delayed_sae(sae: SAEParams, layer: int) -> Any:
    """``sae`` as one opaque Dask object, keyed by layer and weight digest (not by dask's tokenize of its tensors)."""
    return dask.delayed(sae, name=f"sae-{layer}-{sae.digest()}", traverse=False)


def compute_layer_stats(
    ds: xr.Dataset, saes: dict[int, SAEParams], layers: Sequence[int] | None = None, backend: str = "auto",
    scheduler: Any = None, weight_dtype: str = "float32", top_k: int = 0, image_top: int = 0, progress: bool = False,
    tokens_per_task: int | None = None,
) -> xr.Dataset:
    """Statistics of every layer's SAE on the image and text tokens of ``ds`` (an ``actstore.open`` dataset); with
    ``top_k``, each latent's k most activating tokens per kind (``top_token`` indexes image tokens as
    image * image_tokens + position, text tokens along ``text_token``); with ``image_top``, each image's most active
    latents (``image_top_latents``, by activation summed over the image's tokens). One pass over the store; each
    task runs about ``tokens_per_task`` tokens (whole stored chunks, at least one) on the device at once (default:
    :func:`default_tokens_per_task`: grouped where the workers, or this process without a cluster, have a GPU)."""
    layers = list(layers) if layers is not None else [int(x) for x in ds.layer.values if int(x) in saes]
    missing = [x for x in layers if x not in saes]
    if missing:
        raise ValueError(f"no SAE for layer(s) {missing}; the suite has layers {sorted(saes)}")
    d_model = ds.sizes["d_model"]
    for layer in layers:
        if saes[layer].d_in != d_model:
            raise ValueError(f"the SAE for layer {layer} has d_in={saes[layer].d_in}, the store has d_model={d_model}")
    widths = {saes[x].d_sae for x in layers}
    if len(widths) != 1:
        raise ValueError(f"all SAEs of a suite must have one width to share the latent axis, got {sorted(widths)}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {sorted(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    # One opaque object per layer (traverse=False), which every task of the layer receives as is: SAEParams.on then
    # copies it to a worker's GPU once, not once per chunk (tests/test_stats.py holds this). Named by its digest:
    # dask would otherwise tokenize it by pickling every weight (1.5-2.6 s per 2304 x 16k SAE on the dev VM).
    tokens_per_task = tokens_per_task or default_tokens_per_task(backend, scheduler)
    graph = {layer: layer_partials(ds, layer, delayed_sae(saes[layer], layer), backend, weight_dtype, top_k, image_top,
                                   tokens_per_task) for layer in layers}
    flat = [(layer, kind, part) for layer, parts in graph.items() for kind, part in parts.items()]
    computed: dict[int, dict[str, Partial]] = {}
    for (layer, kind, _), value in zip(flat, compute_with_progress([p for _, _, p in flat], scheduler, progress)):
        computed.setdefault(layer, {})[kind] = value
    kinds = [k for k in KINDS if k in computed[layers[0]]]
    rows = {layer: {kind: finalize(computed[layer][kind]) for kind in kinds} for layer in layers}
    scalar = ("n_tokens", "fvu", "mse", "mean_rel_err", "mean_cos", "l0_mean", "l0_q10", "l0_median", "l0_q90")
    per_latent = ("fire_freq", "fire_count", "act_mean", "act_max", "act_argmax")
    data = {name: (("layer", "kind"), np.array([[rows[x][k][name] for k in kinds] for x in layers]))
            for name in scalar}
    data.update({name: (("layer", "kind", "latent"), np.stack([[rows[x][k][name] for k in kinds] for x in layers]))
                 for name in per_latent})
    data["l0_hist"] = (("layer", "kind", "l0"), np.stack([[rows[x][k]["l0_hist"] for k in kinds] for x in layers]))
    for name in ("top_act", "top_token"):
        data[name] = (("layer", "kind", "latent", "rank"),
                      np.stack([[rows[x][k][name] for k in kinds] for x in layers]))
    if image_top:
        data["image_top_latents"] = (("layer", "image", "top"),
                                     np.stack([rows[x]["image"]["image_top"] for x in layers]))
    out = xr.Dataset(data, coords={"layer": layers, "kind": kinds})
    if {"image", "text"} <= set(kinds):
        fires_image = out.fire_count.sel(kind="image") > 0
        fires_text = out.fire_count.sel(kind="text") > 0
        out["image_only"] = fires_image & ~fires_text
        out["text_only"] = fires_text & ~fires_image
    return out


def analysis_group(name: str) -> str:
    """Where a suite's statistics live inside a store."""
    return f"{ANALYSIS}/{name}"


StorageOptions = dict[str, Any] | None  # fsspec options of a URL (credentials, endpoint), as actstore.open takes


def _write_group(location: str, group: str, stats: xr.Dataset, storage_options: StorageOptions = None) -> None:
    # Strings as objects: zarr v3 stores them as variable-length UTF-8 (its fixed-width form has no stable spec yet).
    stats = stats.assign_coords(kind=stats.kind.values.astype(object))
    # xarray writes a group's attributes before its arrays, so a run killed while saving would leave a group whose
    # unwritten chunks read as fill values under a valid-looking fingerprint. The fingerprint goes in last instead.
    mark = str(stats.attrs.get(ANALYSIS_SAVED_MARK, ""))
    stats.attrs = {k: v for k, v in stats.attrs.items() if k != ANALYSIS_SAVED_MARK}
    store = open_zarr_store(location, read_only=False, storage_options=storage_options)
    stats.to_zarr(store, group=group, mode="w", zarr_format=3, consolidated=False)
    # As a harvest's block markers, the mark vouches for data that must then survive a power cut, not only a kill.
    local = local_path(location)
    if local is not None:
        sync_tree(local / group)
    _mark_saved(store, group, mark)
    if local is not None:
        fsync_path(local / group / "zarr.json")
        fsync_path(local / group)


def _mark_saved(store: zarr.abc.store.Store, group: str, mark: str) -> None:
    zarr.open_group(store, path=group, mode="r+", zarr_format=3).attrs[ANALYSIS_SAVED_MARK] = mark


def _read_group(location: str, group: str, *, load: bool = True,
                storage_options: StorageOptions = None) -> xr.Dataset:
    store = open_zarr_store(location, read_only=True, storage_options=storage_options)
    ds = xr.open_zarr(store, group=group, consolidated=False, zarr_format=3)
    if ANALYSIS_SAVED_MARK not in ds.attrs:
        raise IncompleteAnalysisError(f"{group} in {location} is incomplete: the run saving it was stopped before "
                                      "it finished; run the analysis again")
    return ds.load() if load else ds


def save_stats(location: str, name: str, stats: xr.Dataset, *, storage_options: StorageOptions = None) -> None:
    """Write statistics into the store under ``analysis/<name>`` (replacing a previous run: reruns are idempotent)."""
    _write_group(location, analysis_group(name), stats, storage_options)


def open_stats(location: str, name: str, *, load: bool = True, storage_options: StorageOptions = None) -> xr.Dataset:
    """Statistics saved by :func:`save_stats` (in memory, or lazy with ``load=False``)."""
    return _read_group(location, analysis_group(name), load=load, storage_options=storage_options)


def checkpoint_group(name: str, layer: int | None = None) -> str:
    """Where an analysis keeps its finished layers until the whole result is saved (outside ``analysis/``, so that
    an unfinished run is never listed as an analysis)."""
    return f"{ANALYSIS_PARTIAL}/{name}" + (f"/layer_{layer}" if layer is not None else "")


def save_layer_checkpoint(location: str, name: str, layer: int, stats: xr.Dataset, fingerprint: str, *,
                          storage_options: StorageOptions = None) -> None:
    """Keep one finished layer's statistics, tagged with what produced them."""
    _write_group(location, checkpoint_group(name, layer), stats.assign_attrs(fingerprint=fingerprint), storage_options)


def load_layer_checkpoint(location: str, name: str, layer: int, fingerprint: str, *,
                          storage_options: StorageOptions = None) -> xr.Dataset | None:
    """A layer's statistics kept by an interrupted run with the same ``fingerprint``, else None."""
    try:
        stats = _read_group(location, checkpoint_group(name, layer), storage_options=storage_options)
    except (FileNotFoundError, KeyError, ValueError, OSError, IncompleteAnalysisError):  # absent, or cut short
        return None
    return stats if stats.attrs.get(ANALYSIS_SAVED_MARK) == fingerprint else None


def checkpointed_layers(location: str, name: str, *, storage_options: StorageOptions = None) -> list[int]:
    """The layers an analysis has kept (finished or not; :func:`load_layer_checkpoint` tells which are usable)."""
    try:
        store = open_zarr_store(location, read_only=True, storage_options=storage_options)
        root = zarr.open_group(store, mode="r", zarr_format=3)
        kept = root[checkpoint_group(name)] if checkpoint_group(name) in root else None
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return []
    if kept is None:
        return []
    return sorted(int(key[len("layer_"):]) for key in kept.group_keys()
                  if key.startswith("layer_") and key[len("layer_"):].isdigit())


def remove_checkpoints(location: str, name: str, *, storage_options: StorageOptions = None) -> None:
    """Drop an analysis's kept layers (after its result is saved)."""
    store = open_zarr_store(location, read_only=False, storage_options=storage_options)
    root = zarr.open_group(store, mode="r+", zarr_format=3)
    if checkpoint_group(name) in root:
        del root[checkpoint_group(name)]
    # The shared group goes once no other analysis keeps layers in it, and then only its own metadata (and its folder,
    # if still empty), never recursively: another analysis of this store may have begun keeping its first layer there
    # since the listing. Its layers read without the parent's metadata, and its next save writes that again.
    metadata = f"{ANALYSIS_PARTIAL}/zarr.json"
    if set(list_keys(root.store, f"{ANALYSIS_PARTIAL}/")) <= {metadata}:
        sync(root.store.delete(metadata))
        local = local_path(location)
        if local is not None:
            with contextlib.suppress(OSError):  # gone already, or another analysis's layers are in it
                os.rmdir(local / ANALYSIS_PARTIAL)
