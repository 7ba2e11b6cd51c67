"""Plain-torch definition of the SAE statistics that the Triton kernels compute, chunked over tokens so that it never
holds more than a bounded tokens x latents block. All arithmetic is float32; this is the kernels' oracle, and the
tests hold it to sae-lens.

Definitions (per token t, latents j):
    sae_in = x - b_dec if apply_b_dec_to_input else x
    pre    = sae_in @ W_enc + b_enc
    z      = relu(pre) * (pre > threshold)                  "jumprelu" (as sae-lens' JumpReLUSAE)
           = relu(pre)                                      "relu"     (StandardSAE)
           = relu(pre) on the k largest pre of the token    "topk"     (TopKSAE)
    x_hat  = z @ W_dec + b_dec
    per token:  sq_err = ||x - x_hat||^2, x_sq = ||x||^2, x_dot_xhat = x . x_hat, xhat_sq = ||x_hat||^2,
                l0 = #{j : z_j > 0}
    per latent: fire_count = #{t : z_tj > 0}, act_sum = sum_t z_tj, act_max = max_t z_tj (0 if it never fires),
                act_argmax = smallest t reaching act_max (-1 if it never fires)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

ACTIVATIONS = ("jumprelu", "relu", "topk")
PER_TOKEN = ("sq_err", "x_sq", "x_dot_xhat", "xhat_sq", "l0")
# Bound on the tokens x latents block the reference holds at once (float32 elements: 64 MiB).
MAX_BLOCK_ELEMENTS = 1 << 24


@dataclass
class SAEStats:
    """Per-token and per-latent SAE statistics (float32; ``act_argmax`` int64, -1 where a latent never fires)."""

    sq_err: torch.Tensor
    x_sq: torch.Tensor
    x_dot_xhat: torch.Tensor
    xhat_sq: torch.Tensor
    l0: torch.Tensor
    fire_count: torch.Tensor | None = None
    act_sum: torch.Tensor | None = None
    act_max: torch.Tensor | None = None
    act_argmax: torch.Tensor | None = None
    codes: "SparseCodes | None" = None  # each token's active latents, when asked for (``return_codes``)


@dataclass
class SparseCodes:
    """Active latents of each token in CSR form: token t's latents are ``indices[indptr[t]:indptr[t+1]]`` (ascending)
    with activations ``values[...]``."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor

    def token(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent indices and activations of token ``t``."""
        lo, hi = int(self.indptr[t]), int(self.indptr[t + 1])
        return self.indices[lo:hi], self.values[lo:hi]

    @classmethod
    def from_blocks(cls, counts: list[torch.Tensor], indices: list[torch.Tensor], values: list[torch.Tensor],
                    n_tokens: int, device: torch.device) -> "SparseCodes":
        """Codes from consecutive token blocks' per-token counts, latent indices and activations."""
        indptr = torch.zeros(n_tokens + 1, dtype=torch.int64, device=device)
        if n_tokens:
            indptr[1:] = torch.cat(counts).cumsum(0)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(indptr, torch.cat(indices) if indices else empty, torch.cat(values) if values else empty.float())


def dense_codes(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token counts, latent indices (ascending within a token) and activations of a block of latents z."""
    token, latent = (z > 0).nonzero(as_tuple=True)  # row-major: ascending latent within each token
    return torch.bincount(token, minlength=z.shape[0]), latent, z[token, latent]


def check_sae_inputs(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor | None, b_dec: torch.Tensor | None,
    activation: str, threshold: torch.Tensor | None, k: int | None, apply_b_dec_to_input: bool,
) -> None:
    """Raise ValueError naming the first inconsistency between the input and the SAE's parameters."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.ndim != 2:
        raise ValueError(f"x must be (tokens, d_in), got shape {tuple(x.shape)}")
    if W_enc.ndim != 2:
        raise ValueError(f"W_enc must be (d_in, d_sae), got shape {tuple(W_enc.shape)}")
    d, F = W_enc.shape
    if x.shape[1] != d:
        raise ValueError(f"x has d_in={x.shape[1]} but the SAE's W_enc expects d_in={d} (shape {tuple(W_enc.shape)})")
    if tuple(b_enc.shape) != (F,):
        raise ValueError(f"b_enc must have shape ({F},), got {tuple(b_enc.shape)}")
    if W_dec is not None and tuple(W_dec.shape) != (F, d):
        raise ValueError(f"W_dec must have shape ({F}, {d}) to match W_enc, got {tuple(W_dec.shape)}")
    if b_dec is not None and tuple(b_dec.shape) != (d,):
        raise ValueError(f"b_dec must have shape ({d},), got {tuple(b_dec.shape)}")
    if apply_b_dec_to_input and b_dec is None:
        raise ValueError("apply_b_dec_to_input needs b_dec")
    if activation == "jumprelu" and (threshold is None or tuple(threshold.shape) != (F,)):
        got = None if threshold is None else tuple(threshold.shape)
        raise ValueError(f"jumprelu needs a per-latent threshold of shape ({F},), got {got}")
    if activation == "topk" and (k is None or not 1 <= k <= F):
        raise ValueError(f"topk needs 1 <= k <= d_sae={F}, got k={k}")
    for name, t in (("x", x), ("W_enc", W_enc), ("W_dec", W_dec)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")


def token_chunks(n_tokens: int, n_latents: int, max_elements: int = MAX_BLOCK_ELEMENTS) -> Iterator[slice]:
    """Token ranges whose tokens x latents block stays within ``max_elements``."""
    rows = max(1, max_elements // max(1, n_latents))
    for start in range(0, n_tokens, rows):
        yield slice(start, min(n_tokens, start + rows))


def activate(pre: torch.Tensor, activation: str, threshold: torch.Tensor | None, k: int | None) -> torch.Tensor:
    """The SAE's activation function applied to pre-activations (float32)."""
    if activation == "jumprelu":
        return pre.relu() * (pre > threshold.float())
    if activation == "relu":
        return pre.relu()
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def _encode_block(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor | None, activation: str,
    threshold: torch.Tensor | None, k: int | None, apply_b_dec_to_input: bool,
) -> torch.Tensor:
    sae_in = x.float()
    if apply_b_dec_to_input:
        sae_in = sae_in - b_dec.float()
    return activate(sae_in @ W_enc.float() + b_enc.float(), activation, threshold, k)


@torch.no_grad()
def sae_stats_reference(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
    activation: str, threshold: torch.Tensor | None = None, k: int | None = None,
    apply_b_dec_to_input: bool = False, feature_stats: bool = True, return_codes: bool = False,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> SAEStats:
    """Per-token errors and L0, and per-latent firing statistics, of an SAE on ``x`` (tokens, d_in); with
    ``return_codes``, also every token's active latents (``SAEStats.codes``)."""
    check_sae_inputs(x, W_enc, b_enc, W_dec, b_dec, activation, threshold, k, apply_b_dec_to_input)
    N, F = x.shape[0], W_enc.shape[1]
    dev = x.device
    per_token = {name: torch.empty(N, dtype=torch.float32, device=dev) for name in PER_TOKEN}
    fire = torch.zeros(F, dtype=torch.float32, device=dev)
    act_sum = torch.zeros(F, dtype=torch.float32, device=dev)
    act_max = torch.zeros(F, dtype=torch.float32, device=dev)
    act_argmax = torch.full((F,), -1, dtype=torch.int64, device=dev)
    W_dec32, b_dec32 = W_dec.float(), b_dec.float()
    blocks = ([], [], [])
    for rows in token_chunks(N, F, max_block_elements):
        z = _encode_block(x[rows], W_enc, b_enc, b_dec, activation, threshold, k, apply_b_dec_to_input)
        if return_codes:
            for kept, part in zip(blocks, dense_codes(z)):
                kept.append(part)
        x32 = x[rows].float()
        x_hat = z @ W_dec32 + b_dec32
        per_token["sq_err"][rows] = (x32 - x_hat).square().sum(-1)
        per_token["x_sq"][rows] = x32.square().sum(-1)
        per_token["x_dot_xhat"][rows] = (x32 * x_hat).sum(-1)
        per_token["xhat_sq"][rows] = x_hat.square().sum(-1)
        active = z > 0
        per_token["l0"][rows] = active.sum(-1).float()
        if feature_stats:
            fire += active.sum(0).float()
            act_sum += z.sum(0)
            block_max = z.max(0).values
            # first token reaching the block's max (torch.argmax returns the first maximal index)
            block_arg = (z == block_max).to(torch.uint8).argmax(0) + rows.start
            better = (block_max > act_max) & (block_max > 0)  # strict: an earlier block keeps ties
            act_max = torch.where(better, block_max, act_max)
            act_argmax = torch.where(better, block_arg, act_argmax)
    stats = SAEStats(**per_token)
    if return_codes:
        stats.codes = SparseCodes.from_blocks(*blocks, N, dev)
    if feature_stats:
        stats.fire_count, stats.act_sum, stats.act_max, stats.act_argmax = fire, act_sum, act_max, act_argmax
    return stats


@torch.no_grad()
def sae_encode_sparse_reference(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, *, activation: str,
    threshold: torch.Tensor | None = None, k: int | None = None, apply_b_dec_to_input: bool = False,
    b_dec: torch.Tensor | None = None, max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> SparseCodes:
    """The active latents of every token of ``x`` and their activations, in CSR form."""
    check_sae_inputs(x, W_enc, b_enc, None, b_dec, activation, threshold, k, apply_b_dec_to_input)
    N, F = x.shape[0], W_enc.shape[1]
    blocks = ([], [], [])
    for rows in token_chunks(N, F, max_block_elements):
        z = _encode_block(x[rows], W_enc, b_enc, b_dec, activation, threshold, k, apply_b_dec_to_input)
        for kept, part in zip(blocks, dense_codes(z)):
            kept.append(part)
    return SparseCodes.from_blocks(*blocks, N, x.device)
