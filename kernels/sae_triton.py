"""Fused Triton SAE kernels: encode + activation + every statistic, then a sparse decode, never materialising the
tokens x latents matrix. ``kernels/reference.py`` defines what they compute.

Two kernels:
- ``_encode_kernel`` (grid: token tiles x latent tiles): ``pre = x @ W_enc + c`` on tensor cores, then in the
  epilogue the JumpReLU/ReLU activation, per-token active counts (= L0), each token's active (latent, value) pairs
  appended to a compact ``(N, cap)`` buffer (slots from one atomic per row plus an in-tile prefix sum), and
  per-latent fire count, activation sum, and max with its token (packed into one int64 for a single atomic max).
  ``c = b_enc - b_dec @ W_enc`` folds ``apply_b_dec_to_input`` into the bias, so the GEMM reads ``x`` unchanged.
- ``_decode_kernel`` (grid: token tiles): gathers the ``L0`` active rows of ``W_dec`` per token (L0 << d_sae) and
  reduces ``||x - x_hat||^2``, ``||x||^2``, ``x . x_hat``, ``||x_hat||^2`` on the fly.
Extra memory is O(N * cap + d_sae); ``cap`` (slots per token) grows as far as a fixed buffer budget allows, so that
out-of-distribution tokens with L0 in the thousands (image tokens under a text SAE) stay on the fast path. Tokens
with more than ``cap`` active latents are recomputed by the chunked reference (a fallback, never a truncation).
TopK needs each token's whole row of pre-activations before it can select, so its encode is a chunked GEMM +
``torch.topk`` (bounded memory) feeding the same decode kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import scatter_kept, wait_for_stream  # the package is initialised before this module is imported
from kernels.reference import (
    SAEStats,
    SparseCodes,
    check_sae_inputs,
    sae_encode_sparse_reference,
    sae_stats_reference,
    token_chunks,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MIN_CAP = 256
# The (N, cap) code buffer (int32 index + float32 value per slot) may use this much device memory; torch.empty
# leaves it untouched beyond the slots written, so a larger cap costs memory, not time.
CODE_BUFFER_BYTES = 128 << 20
_INDEX_BITS = 2147483647  # token t is stored as (2^31 - 1 - t) so that the smallest t wins ties in an atomic max
_INDEX_BITS_C = tl.constexpr(_INDEX_BITS)  # compiled Triton reads only constexpr globals


def _encode_configs() -> list[triton.Config]:
    if INTERPRET:  # one config; tiles still smaller than the tests' odd shapes, so every mask is exercised
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 2}, num_warps=4)]
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages: Hopper-sized tiles (228 KB shared memory per SM)
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
        (64, 256, 64, 4, 4), (128, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def _decode_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_D": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_D": dd}, num_warps=w)
        for m, dd, w in [(16, 256, 4), (32, 256, 8), (16, 512, 8), (8, 512, 4), (32, 128, 4)]
    ]


@triton.autotune(
    configs=_encode_configs(), key=["d", "F", "DOT_DTYPE"],
    reset_to_zero=["counts_ptr", "fire_ptr", "sum_ptr", "max_ptr"],  # tuning runs must not accumulate
)
@triton.jit
def _encode_kernel(
    x_ptr, w_ptr, c_ptr, thr_ptr, counts_ptr, idx_ptr, val_ptr, fire_ptr, sum_ptr, max_ptr,
    N, d, F, cap, stride_xm, stride_xk, stride_wk, stride_wn,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, FEATURE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: consecutive programs share W_enc column panels in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = tl.cdiv(F, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d
        a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    thr = tl.load(thr_ptr + cols, mask=col_ok, other=0.0)
    pre = acc + c[None, :]
    active = (pre > thr[None, :]) & row_ok[:, None] & col_ok[None, :]
    z = tl.where(active, pre, 0.0)
    active_i = active.to(tl.int32)

    base = tl.atomic_add(counts_ptr + rows, tl.sum(active_i, axis=1), mask=row_ok)
    slot = base[:, None] + tl.cumsum(active_i, axis=1) - 1
    keep = active & (slot < cap)
    where = rows[:, None].to(tl.int64) * cap + slot
    tl.store(idx_ptr + where, cols[None, :] + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), mask=keep)
    tl.store(val_ptr + where, z, mask=keep)

    if FEATURE_STATS:
        tl.atomic_add(fire_ptr + cols, tl.sum(active_i, axis=0), mask=col_ok)
        tl.atomic_add(sum_ptr + cols, tl.sum(z, axis=0), mask=col_ok)
        # z > 0, so its float bits order like integers: (bits << 32 | 2^31-1-row) maxes value, then smallest row.
        packed = (z.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (_INDEX_BITS_C - rows[:, None].to(tl.int64))
        packed = tl.where(active, packed, 0)
        tl.atomic_max(max_ptr + cols, tl.max(packed, axis=0), mask=col_ok)


@triton.autotune(configs=_decode_configs(), key=["d"])  # not cap: it varies with the chunk's token count
@triton.jit
def _decode_kernel(
    x_ptr, wd_ptr, bd_ptr, counts_ptr, idx_ptr, val_ptr, out_ptr,
    N, d, cap, stride_xm, stride_xk, stride_wf, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    n_codes = tl.minimum(tl.load(counts_ptr + rows, mask=row_ok, other=0), cap)
    n_iter = tl.max(n_codes, axis=0)
    code_base = rows.to(tl.int64) * cap
    sq_err = tl.zeros((BLOCK_M,), dtype=tl.float32)
    x_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    x_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    xhat_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d
        b = tl.load(bd_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
        x_hat = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32) + b[None, :]
        for j in range(0, n_iter):
            live = row_ok & (j < n_codes)
            latent = tl.load(idx_ptr + code_base + j, mask=live, other=0)
            value = tl.load(val_ptr + code_base + j, mask=live, other=0.0)
            w = tl.load(wd_ptr + latent[:, None].to(tl.int64) * stride_wf + ds[None, :] * stride_wd,
                        mask=live[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            x_hat += value[:, None] * w
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ds[None, :] * stride_xk,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        diff = x - x_hat
        sq_err += tl.sum(diff * diff, axis=1)
        x_sq += tl.sum(x * x, axis=1)
        x_dot += tl.sum(x * x_hat, axis=1)
        xhat_sq += tl.sum(x_hat * x_hat, axis=1)
    tl.store(out_ptr + rows, sq_err, mask=row_ok)
    tl.store(out_ptr + N + rows, x_sq, mask=row_ok)
    tl.store(out_ptr + 2 * N + rows, x_dot, mask=row_ok)
    tl.store(out_ptr + 3 * N + rows, xhat_sq, mask=row_ok)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _dot_dtype(x: torch.Tensor, W_enc: torch.Tensor) -> torch.dtype:
    """Tensor-core input dtype: the common 16-bit type when both are one, else float32 (exact, no tf32).

    Triton's interpreter computes bf16 dots wrongly (numpy has no bf16), so there bf16 goes through float32: the
    same products (bf16 x bf16 is exact in fp32) with fp32 accumulation, which is what the tensor cores do."""
    if x.dtype != W_enc.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        return torch.float32
    return torch.float32 if INTERPRET and x.dtype == torch.bfloat16 else x.dtype


def _encode_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor | None, apply: bool) -> torch.Tensor:
    c = b_enc.float()
    if apply:
        c = c - b_dec.float() @ W_enc.float()  # (x - b_dec) @ W + b == x @ W + (b - b_dec @ W)
    return c.contiguous()


def _effective_threshold(activation: str, threshold: torch.Tensor | None, F: int, device: torch.device) -> torch.Tensor:
    """Active iff pre > this: relu(pre) * (pre > theta) is nonzero exactly when pre > max(theta, 0)."""
    zero = torch.zeros(F, dtype=torch.float32, device=device)
    return zero if activation == "relu" else torch.maximum(threshold.float(), zero).contiguous()


def code_capacity(n_tokens: int, d_sae: int, cap: int | None = None) -> int:
    """Code slots per token: ``cap`` if given, else as many as ``CODE_BUFFER_BYTES`` holds (at least ``MIN_CAP``),
    never more than ``d_sae``."""
    if cap is None:
        cap = max(MIN_CAP, CODE_BUFFER_BYTES // (8 * max(n_tokens, 1)))
    return max(1, min(cap, d_sae))


def _filled_slots(counts: torch.Tensor, cap: int) -> torch.Tensor:
    """(N, cap) mask of the buffer slots the encode kernel filled: the first min(count, cap) of each token."""
    return torch.arange(cap, device=counts.device)[None, :] < counts.clamp(max=cap)[:, None]


def _buffer_codes(lengths: torch.Tensor, codes_idx: torch.Tensor, codes_val: torch.Tensor, valid: torch.Tensor,
                  overflow: torch.Tensor, exact: SparseCodes | None) -> SparseCodes:
    """CSR codes from the per-token slot buffer (``valid`` marks the slots holding codes, ``lengths`` each token's
    true count); the ``overflow`` tokens take their codes from ``exact`` instead."""
    N, dev = len(lengths), lengths.device
    lengths = lengths.long()
    if len(overflow):
        # The fallback's own counts: its float rounding may put a latent near its threshold on the other side, and
        # the layout must hold exactly the codes written below (a longer row would run into the next token's).
        lengths = lengths.clone()
        lengths[overflow] = exact.indptr.diff()
    # The widest slot in use (the buffer may be far wider than the largest L0) and the number of codes size the
    # buffers below: both cross from the device in one read-back, the only one here.
    slot_ends = torch.arange(1, valid.shape[1] + 1, device=dev)
    last = torch.where(valid, slot_ends, 0).amax() if valid.numel() else torch.zeros((), dtype=torch.int64, device=dev)
    used, n_codes = (int(v) for v in torch.stack([last.long(), lengths.sum()]).tolist())
    valid = valid[:, :used]
    # Slots fill in tile order: sort each token's latents ascending, invalid slots last.
    empty = torch.iinfo(torch.int64).max
    idx, order = torch.where(valid, codes_idx[:, :used].long(), empty).sort(dim=1)
    val, valid = codes_val[:, :used].gather(1, order), idx != empty
    indptr = torch.zeros(N + 1, dtype=torch.int64, device=dev)
    indptr[1:] = lengths.cumsum(0)
    fits = torch.ones(N, dtype=torch.bool, device=dev)
    fits[overflow] = False
    keep = valid & fits[:, None]
    positions = indptr[:-1, None] + torch.arange(used, device=dev)[None, :]
    indices, values = (scatter_kept(n_codes, keep, positions, v) for v in (idx, val))
    if len(overflow):
        counts = exact.indptr.diff()
        spread = {"output_size": len(exact.indices)}  # known here: no read-back of the counts' sum
        within = torch.arange(len(exact.indices), device=dev) - exact.indptr[:-1].repeat_interleave(counts, **spread)
        at = indptr[overflow].repeat_interleave(counts, **spread) + within
        indices[at], values[at] = exact.indices, exact.values
    return SparseCodes(indptr, indices, values)


def _launch_encode(
    x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, thr: torch.Tensor, cap: int, feature_stats: bool
) -> tuple[torch.Tensor, ...]:
    N, d = x.shape
    F = W_enc.shape[1]
    dev = x.device
    counts = torch.zeros(N, dtype=torch.int32, device=dev)
    codes_idx = torch.empty((N, cap), dtype=torch.int32, device=dev)
    codes_val = torch.empty((N, cap), dtype=torch.float32, device=dev)
    fire = torch.zeros(F if feature_stats else 1, dtype=torch.int32, device=dev)
    act_sum = torch.zeros(F if feature_stats else 1, dtype=torch.float32, device=dev)
    packed = torch.zeros(F if feature_stats else 1, dtype=torch.int64, device=dev)
    dot = _dot_dtype(x, W_enc)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"]),)  # noqa: E731
    _encode_kernel[grid](
        x, W_enc, c, thr, counts, codes_idx, codes_val, fire, act_sum, packed,
        N, d, F, cap, x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        DOT_DTYPE=_TL_DTYPES[dot], IEEE=dot == torch.float32, FEATURE_STATS=feature_stats,
    )
    return counts, codes_idx, codes_val, fire, act_sum, packed


def _launch_decode(
    x: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, counts: torch.Tensor, codes_idx: torch.Tensor,
    codes_val: torch.Tensor,
) -> torch.Tensor:
    N, d = x.shape
    cap = codes_idx.shape[1]
    out = torch.empty((4, N), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),)  # noqa: E731
    _decode_kernel[grid](
        x, W_dec, b_dec, counts, codes_idx, codes_val, out,
        N, d, cap, x.stride(0), x.stride(1), W_dec.stride(0), W_dec.stride(1),
    )
    return out


def _unpack_max(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fired = packed > 0
    value = (packed >> 32).to(torch.int32).view(torch.float32)
    token = _INDEX_BITS - (packed & 0xFFFFFFFF)
    return torch.where(fired, value, 0.0), torch.where(fired, token, -1)


def _topk_codes(
    x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, k: int, feature_stats: bool
) -> tuple[torch.Tensor, ...]:
    """TopK codes by chunks of tokens (bounded tokens x latents block), in the layout the decode kernel reads."""
    N, F = x.shape[0], W_enc.shape[1]
    dev = x.device
    codes_idx = torch.empty((N, k), dtype=torch.int32, device=dev)
    codes_val = torch.empty((N, k), dtype=torch.float32, device=dev)
    l0 = torch.empty(N, dtype=torch.int32, device=dev)
    fire = torch.zeros(F, dtype=torch.int32, device=dev)
    act_sum = torch.zeros(F, dtype=torch.float32, device=dev)
    packed = torch.zeros(F, dtype=torch.int64, device=dev)
    W32 = W_enc.float()
    for rows in token_chunks(N, F):
        pre = torch.addmm(c, x[rows].float(), W32)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.relu()
        codes_idx[rows], codes_val[rows] = indices.to(torch.int32), values
        active = values > 0
        l0[rows] = active.sum(-1, dtype=torch.int32)
        if feature_stats:
            flat_idx = indices.reshape(-1)
            fire.index_add_(0, flat_idx, active.reshape(-1).to(torch.int32))
            act_sum.index_add_(0, flat_idx, values.reshape(-1))
            token = torch.arange(rows.start, rows.stop, device=dev)[:, None].expand_as(values)
            key = (values.view(torch.int32).to(torch.int64) << 32) | (_INDEX_BITS - token)
            packed.scatter_reduce_(0, flat_idx, torch.where(active, key, 0).reshape(-1), reduce="amax")
    return l0, codes_idx, codes_val, fire, act_sum, packed


@torch.no_grad()
def sae_stats_triton(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
    activation: str, threshold: torch.Tensor | None = None, k: int | None = None,
    apply_b_dec_to_input: bool = False, feature_stats: bool = True, return_codes: bool = False,
    cap: int | None = None,
) -> SAEStats:
    """:func:`kernels.reference.sae_stats_reference`, computed by the fused kernels (the codes, with
    ``return_codes``, come from the encode's own buffer: no second encode)."""
    check_sae_inputs(x, W_enc, b_enc, W_dec, b_dec, activation, threshold, k, apply_b_dec_to_input)
    N, F = x.shape[0], W_enc.shape[1]
    c = _encode_bias(W_enc, b_enc, b_dec, apply_b_dec_to_input)
    if activation == "topk":
        l0, codes_idx, codes_val, fire, act_sum, packed = _topk_codes(x, W_enc, c, k, feature_stats)
        counts = torch.full_like(l0, k)  # every top-k slot is decoded; relu'd zeros add nothing
    else:
        cap = code_capacity(N, F, cap)
        thr = _effective_threshold(activation, threshold, F, x.device)
        counts, codes_idx, codes_val, fire, act_sum, packed = _launch_encode(x, W_enc, c, thr, cap, feature_stats)
        l0 = counts
    out = _launch_decode(x, W_dec, b_dec, counts, codes_idx, codes_val)
    stats = SAEStats(sq_err=out[0], x_sq=out[1], x_dot_xhat=out[2], xhat_sq=out[3], l0=l0.float())
    wait_for_stream(x.device)  # nonzero() below reads back from the device, and CUDA's own wait spins a core
    overflow = (counts > codes_idx.shape[1]).nonzero().flatten()
    exact = None
    if len(overflow):  # more active latents than the buffer holds: these tokens go through the reference
        exact = sae_stats_reference(
            x[overflow], W_enc, b_enc, W_dec, b_dec, activation=activation, threshold=threshold, k=k,
            apply_b_dec_to_input=apply_b_dec_to_input, feature_stats=False, return_codes=return_codes,
        )
        for name in ("sq_err", "x_sq", "x_dot_xhat", "xhat_sq", "l0"):  # L0 too: it must count the codes returned
            getattr(stats, name)[overflow] = getattr(exact, name)
    if return_codes:
        if activation == "topk":  # the slots that relu zeroed are not codes
            valid = codes_val > 0
            lengths = valid.sum(1)
        else:
            valid, lengths = _filled_slots(counts, codes_idx.shape[1]), l0
        stats.codes = _buffer_codes(lengths, codes_idx, codes_val, valid, overflow,
                                    exact.codes if exact is not None else None)
    if feature_stats:
        stats.fire_count, stats.act_sum = fire.float(), act_sum
        stats.act_max, stats.act_argmax = _unpack_max(packed)
    return stats


@torch.no_grad()
def sae_encode_sparse_triton(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, *, activation: str,
    threshold: torch.Tensor | None = None, k: int | None = None, apply_b_dec_to_input: bool = False,
    b_dec: torch.Tensor | None = None, cap: int | None = None,
) -> SparseCodes:
    """:func:`kernels.reference.sae_encode_sparse_reference`, with the fused encode kernel for JumpReLU/ReLU."""
    check_sae_inputs(x, W_enc, b_enc, None, b_dec, activation, threshold, k, apply_b_dec_to_input)
    if activation == "topk":  # selection needs whole rows: the chunked reference is already the right shape
        return sae_encode_sparse_reference(
            x, W_enc, b_enc, activation=activation, k=k, apply_b_dec_to_input=apply_b_dec_to_input, b_dec=b_dec
        )
    N, F = x.shape[0], W_enc.shape[1]
    cap = code_capacity(N, F, cap)
    c = _encode_bias(W_enc, b_enc, b_dec, apply_b_dec_to_input)
    thr = _effective_threshold(activation, threshold, F, x.device)
    counts, codes_idx, codes_val, *_ = _launch_encode(x, W_enc, c, thr, cap, feature_stats=False)
    valid = _filled_slots(counts, cap)
    overflow = (counts > cap).nonzero().flatten()
    exact = None
    if len(overflow):  # rebuilt with the overflowing tokens' complete codes from the reference
        exact = sae_encode_sparse_reference(
            x[overflow], W_enc, b_enc, activation=activation, threshold=threshold,
            apply_b_dec_to_input=apply_b_dec_to_input, b_dec=b_dec,
        )
    return _buffer_codes(counts, codes_idx, codes_val, valid, overflow, exact)
