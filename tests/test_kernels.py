"""The SAE kernels against sae-lens (the oracle for SAE maths), and the Triton path against the reference.

Without a GPU the Triton path runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1). Each test SAE is
built so that no pre-activation lies within ~1e-3 of its decision boundary: fp32 sums in another order legitimately
differ by ~1e-6, and a test must not depend on which side of a threshold such a value falls.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from kernels import sae_encode_sparse, sae_stats
from kernels.reference import PER_TOKEN, SAEStats, SparseCodes, sae_stats_reference

sae_lens = pytest.importorskip("sae_lens")

MARGIN = 1e-3
# The Triton path runs compiled on the GPU where there is one (its inputs must live there), interpreted elsewhere.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Case:
    """An SAE, its input, and the same SAE as a sae-lens module."""

    x: torch.Tensor
    params: dict
    kwargs: dict
    oracle: torch.nn.Module


def _boundary_between(sorted_col: torch.Tensor, index: int) -> tuple[float, float]:
    """A value with ``len - index`` entries above it, placed mid-gap (the widest of nearby gaps)."""
    n = len(sorted_col)
    if index <= 0:
        return float(sorted_col[0]) - 1.0, 1.0
    if index >= n:
        return float(sorted_col[-1]) + 1.0, 1.0
    options = [i for i in range(max(1, index - 2), min(n, index + 3))]
    best = max(options, key=lambda i: float(sorted_col[i] - sorted_col[i - 1]))
    lo, hi = float(sorted_col[best - 1]), float(sorted_col[best])
    return (lo + hi) / 2, (hi - lo) / 2


def make_case(
    activation: str, *, N: int = 77, d: int = 100, F: int = 300, x_dtype=torch.float32, w_dtype=torch.float32,
    active_fraction: float = 0.05, apply_b_dec: bool = False, k: int | None = None, seed: int = 0,
) -> Case:
    """An SAE whose latents are each active on about ``active_fraction`` of the tokens (L0 ~ that x F)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, d, generator=g) * 2).to(x_dtype)
    W_enc = (torch.randn(d, F, generator=g) / d**0.5).to(w_dtype)
    W_dec = (torch.randn(F, d, generator=g) / F**0.5).to(w_dtype)
    b_dec = (torch.randn(d, generator=g) * 0.3).to(w_dtype)
    sae_in = x.double() - (b_dec.double() if apply_b_dec else 0.0)
    pre0 = sae_in @ W_enc.double()
    cols = pre0.sort(dim=0).values
    index = round((1 - active_fraction) * N)
    threshold = None
    if activation == "jumprelu":
        b_enc = 0.5 - cols[0]  # every pre-activation > 0, so the threshold alone decides
        bounds = [_boundary_between(cols[:, j] + b_enc[j], index) for j in range(F)]
        threshold = torch.tensor([b for b, _ in bounds], dtype=torch.float32)
    elif activation == "relu":
        bounds = [_boundary_between(cols[:, j], index) for j in range(F)]
        b_enc = -torch.tensor([b for b, _ in bounds], dtype=torch.float64)
    else:
        b_enc = torch.randn(F, generator=g, dtype=torch.float64) * 0.5
        bounds = [(0.0, 1.0)]
    b_enc = b_enc.float()
    assert min(gap for _, gap in bounds) > MARGIN, "test SAE too close to a decision boundary; change the seed"
    if activation == "topk":
        top = (pre0 + b_enc.double()).topk(min(F, k + 1), dim=-1).values
        near_tie = k < F and (top[:, k - 1] - top[:, k]).min() <= MARGIN / 10
        if near_tie or (top[:, :k].abs() <= MARGIN / 10).any():  # the next seed, deterministically
            return make_case(activation, N=N, d=d, F=F, x_dtype=x_dtype, w_dtype=w_dtype,
                             active_fraction=active_fraction, apply_b_dec=apply_b_dec, k=k, seed=seed + 1000)

    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    kwargs = {"activation": activation, "threshold": threshold, "k": k, "apply_b_dec_to_input": apply_b_dec}
    common = dict(d_in=d, d_sae=F, dtype="float32", device="cpu", apply_b_dec_to_input=apply_b_dec)
    if activation == "jumprelu":
        oracle = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common))
    elif activation == "relu":
        oracle = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**common))
    else:
        oracle = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(k=k, **common))
    with torch.no_grad():
        for name, value in params.items():
            getattr(oracle, name).copy_(value.float())
        if threshold is not None:
            oracle.threshold.copy_(threshold)
    return Case(x, params, kwargs, oracle)


def oracle_stats(case: Case) -> tuple[SAEStats, torch.Tensor]:
    """The statistics computed in float64 from sae-lens' own encode and decode; also returns its latents."""
    with torch.no_grad():
        z = case.oracle.encode(case.x).double()
        x_hat = case.oracle.decode(z.float()).double()
    x = case.x.double()
    active = z > 0
    act_max = z.max(0).values
    first = (z == act_max).to(torch.uint8).argmax(0)
    stats = SAEStats(
        sq_err=(x - x_hat).square().sum(-1), x_sq=x.square().sum(-1), x_dot_xhat=(x * x_hat).sum(-1),
        xhat_sq=x_hat.square().sum(-1), l0=active.sum(-1).double(), fire_count=active.sum(0).double(),
        act_sum=z.sum(0), act_max=act_max, act_argmax=torch.where(act_max > 0, first, -1),
    )
    return stats, z


def assert_stats_match(got: SAEStats, want: SAEStats, feature_stats: bool = True) -> None:
    """Tolerances: per-token sums of squares to 1e-4 of the token's scale; counts and argmax exact."""
    scale = (want.x_sq + want.xhat_sq).double() + 1e-6
    for name in ("sq_err", "x_sq", "x_dot_xhat", "xhat_sq"):
        diff = (getattr(got, name).double() - getattr(want, name).double()).abs()
        assert (diff <= 1e-4 * scale).all(), f"{name}: worst relative error {(diff / scale).max():.2e}"
    assert torch.equal(got.l0.double(), want.l0.double()), "l0 differs"
    for name in PER_TOKEN:
        assert getattr(got, name).dtype == torch.float32
    if not feature_stats:
        assert got.fire_count is None
        return
    assert torch.equal(got.fire_count.double(), want.fire_count.double()), "fire_count differs"
    torch.testing.assert_close(got.act_sum.double(), want.act_sum.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.act_max.double(), want.act_max.double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(got.act_argmax.long(), want.act_argmax.long()), "act_argmax differs"


def on_device(value, device: str = KERNEL_DEVICE):
    """Tensors (also inside dicts and dataclasses of results) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: on_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(on_device(v, device) for v in value)
    if isinstance(value, (SAEStats, SparseCodes)):
        return type(value)(**{k: on_device(v, device) for k, v in vars(value).items()})
    return value


def triton_call(fn, case: Case, *args, **extra):
    """``fn`` on the case's tensors on the kernel device; results back on the CPU for the comparison."""
    return on_device(fn(on_device(case.x), *on_device(args), **on_device(extra)), "cpu")


def run(case: Case, backend: str, **extra) -> SAEStats:
    if backend == "triton":
        return triton_call(sae_stats, case, **case.params, **case.kwargs, backend=backend, **extra)
    return sae_stats(case.x, **case.params, **case.kwargs, backend=backend, **extra)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("x_dtype", list(DTYPES))
@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize("activation, k", [("jumprelu", None), ("relu", None), ("topk", 13)])
def test_matches_sae_lens(backend, x_dtype, apply_b_dec, activation, k):
    dtype = DTYPES[x_dtype]
    case = make_case(activation, x_dtype=dtype, w_dtype=dtype, apply_b_dec=apply_b_dec, k=k, seed=1)
    want, _ = oracle_stats(case)
    assert 0 < want.l0.mean() < 300
    assert_stats_match(run(case, backend), want)


@pytest.mark.parametrize("x_dtype, w_dtype",
                         [("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "bfloat16")])
def test_mixed_dtypes(x_dtype, w_dtype):
    case = make_case("jumprelu", x_dtype=DTYPES[x_dtype], w_dtype=DTYPES[w_dtype], apply_b_dec=True, seed=2)
    assert_stats_match(run(case, "triton"), oracle_stats(case)[0])


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
@pytest.mark.parametrize("active_fraction", [0.0, 0.5, 1.0])
def test_l0_from_zero_to_all_latents(activation, active_fraction):
    from kernels.sae_triton import sae_stats_triton

    case = make_case(activation, active_fraction=active_fraction, apply_b_dec=True, seed=3)
    want, _ = oracle_stats(case)
    assert want.l0.mean() == pytest.approx(active_fraction * 300, abs=3)
    assert_stats_match(run(case, "triton"), want)
    if want.l0.max() > 256:  # with a buffer of 256 slots, these tokens take the exact fallback
        assert_stats_match(triton_call(sae_stats_triton, case, **case.params, **case.kwargs, cap=256), want)
    assert_stats_match(run(case, "reference"), want)


@pytest.mark.parametrize("k", [1, 300])
def test_topk_extremes(k):
    case = make_case("topk", k=k, seed=4)
    want, _ = oracle_stats(case)
    assert_stats_match(run(case, "triton"), want)


def test_small_cap_falls_back_instead_of_truncating():
    from kernels.sae_triton import sae_stats_triton

    case = make_case("jumprelu", active_fraction=0.1, seed=5)
    want, _ = oracle_stats(case)
    got = triton_call(sae_stats_triton, case, **case.params, **case.kwargs, cap=8)  # L0 ~ 30 > 8 for most tokens
    assert (want.l0 > 8).sum() > 10
    assert_stats_match(got, want)


def codes_without_last(codes: SparseCodes) -> SparseCodes:
    """The same codes with each token's last latent dropped (a fallback whose rounding disagrees near thresholds)."""
    counts = codes.indptr.diff()
    keep = torch.ones(len(codes.indices), dtype=torch.bool, device=codes.indices.device)
    keep[(codes.indptr[1:] - 1)[counts > 0]] = False
    indptr = torch.zeros_like(codes.indptr)
    indptr[1:] = (counts - (counts > 0).long()).cumsum(0)
    return SparseCodes(indptr, codes.indices[keep], codes.values[keep])


def test_overflow_tokens_take_the_fallbacks_own_codes_and_l0(monkeypatch):
    """The fallback (another rounding) may find fewer or more active latents than the kernel counted for a token;
    the codes and L0 returned must be the fallback's, never the kernel's count laid over the fallback's codes."""
    import kernels.sae_triton as sae_triton

    fallbacks = []

    def disagreeing(*args, **kwargs):
        exact = sae_stats_reference(*args, **kwargs)
        exact.codes = codes_without_last(exact.codes)
        exact.l0 = exact.codes.indptr.diff().float()
        fallbacks.append(exact)
        return exact

    monkeypatch.setattr(sae_triton, "sae_stats_reference", disagreeing)
    case = make_case("jumprelu", active_fraction=0.1, seed=5)
    got = triton_call(sae_triton.sae_stats_triton, case, **case.params, **case.kwargs, return_codes=True, cap=8)
    (exact,) = fallbacks
    kernel_l0 = oracle_stats(case)[0].l0
    overflow = (kernel_l0 > 8).nonzero().flatten()
    assert len(overflow) > 10
    assert torch.equal(got.codes.indptr.diff().double(), got.l0.double()), "codes per token != L0"
    assert torch.equal(got.l0[overflow], kernel_l0[overflow].float() - 1)
    for i, t in enumerate(overflow.tolist()):
        want_indices, want_values = exact.codes.token(i)
        indices, values = got.codes.token(t)
        assert torch.equal(indices.long(), want_indices.long().cpu()) and torch.equal(values, want_values.cpu())
    fits = (kernel_l0 <= 8).nonzero().flatten()
    assert torch.equal(got.l0[fits].double(), kernel_l0[fits])


def test_buffer_codes_lay_out_a_fallback_longer_than_the_kernel_count():
    from kernels.sae_triton import _buffer_codes, _filled_slots

    # token 1 overflowed a 2-slot buffer with a count of 3; the fallback finds 4 latents
    counts = torch.tensor([2, 3, 1])
    codes_idx = torch.tensor([[4, 1], [7, 8], [5, -9]], dtype=torch.int32)
    codes_val = torch.tensor([[0.4, 0.1], [0.7, 0.8], [0.5, -9.0]])
    exact = SparseCodes(torch.tensor([0, 4]), torch.tensor([0, 2, 3, 9]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    codes = _buffer_codes(counts, codes_idx, codes_val, _filled_slots(counts, 2), torch.tensor([1]), exact)
    assert codes.indptr.tolist() == [0, 2, 6, 7]
    assert codes.indices.tolist() == [1, 4, 0, 2, 3, 9, 5]
    assert codes.values.tolist() == pytest.approx([0.1, 0.4, 1.0, 2.0, 3.0, 4.0, 0.5])


def test_feature_stats_off():
    case = make_case("jumprelu", seed=6)
    got = run(case, "triton", feature_stats=False)
    assert_stats_match(got, oracle_stats(case)[0], feature_stats=False)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("activation, k, cap", [("jumprelu", None, None), ("jumprelu", None, 8), ("topk", 9, None)])
def test_encode_sparse_matches_sae_lens(backend, activation, k, cap):
    case = make_case(activation, k=k, active_fraction=0.1, apply_b_dec=True, seed=7)
    _, z = oracle_stats(case)
    kwargs = dict(case.kwargs, b_dec=case.params["b_dec"])
    if backend == "triton":
        from kernels.sae_triton import sae_encode_sparse_triton

        codes = triton_call(sae_encode_sparse_triton, case, case.params["W_enc"], case.params["b_enc"], cap=cap,
                            **kwargs)
    else:
        codes = sae_encode_sparse(case.x, case.params["W_enc"], case.params["b_enc"], backend=backend, **kwargs)
    torch.testing.assert_close(dense_from_codes(codes, z.shape), z, rtol=1e-5, atol=1e-5)
    for t in (0, 40, 76):  # within a token, latents ascend
        indices, _ = codes.token(t)
        assert torch.equal(indices, indices.sort().values)


def dense_from_codes(codes: SparseCodes, shape: tuple[int, int]) -> torch.Tensor:
    """The tokens x latents matrix that CSR codes describe (float64)."""
    dense = torch.zeros(shape, dtype=torch.float64)
    rows = torch.arange(len(codes.indptr) - 1).repeat_interleave(codes.indptr.diff())
    dense[rows, codes.indices] = codes.values.double()
    return dense


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("activation, k, cap", [("jumprelu", None, None), ("jumprelu", None, 8), ("relu", None, None),
                                                 ("topk", 9, None), ("topk", 300, None)])
def test_stats_return_the_codes_of_their_own_encode(backend, activation, k, cap):
    case = make_case(activation, k=k, active_fraction=0.1, apply_b_dec=True, seed=7)
    want, z = oracle_stats(case)
    assert k != 300 or (want.l0 < k).all()  # top-k slots that relu zeroes are not codes
    if backend == "triton":
        from kernels.sae_triton import sae_stats_triton

        got = triton_call(sae_stats_triton, case, **case.params, **case.kwargs, return_codes=True, cap=cap)
    else:
        got = sae_stats(case.x, **case.params, **case.kwargs, backend=backend, return_codes=True)
    assert_stats_match(got, want)
    assert torch.equal(got.codes.indptr.diff().double(), want.l0), "codes per token != L0"
    torch.testing.assert_close(dense_from_codes(got.codes, z.shape), z, rtol=1e-5, atol=1e-5)
    for t in range(len(z)):  # within a token, latents ascend (also for the fallback's tokens)
        indices, _ = got.codes.token(t)
        assert torch.equal(indices, indices.sort().values)
    assert run(case, backend).codes is None  # only when asked for


def test_code_capacity_grows_with_fewer_tokens():
    from kernels.sae_triton import CODE_BUFFER_BYTES, MIN_CAP, code_capacity

    assert code_capacity(4096, 16384) == CODE_BUFFER_BYTES // (8 * 4096) > MIN_CAP
    assert code_capacity(1 << 20, 16384) == MIN_CAP
    assert code_capacity(10, 300) == 300 and code_capacity(10, 300, cap=8) == 8


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, kw: p.update(W_enc=p["W_enc"][:-1]), "x has d_in=100 but the SAE's W_enc expects d_in=99"),
        (lambda p, kw: p.update(W_dec=p["W_dec"][:-1]), r"W_dec must have shape \(300, 100\)"),
        (lambda p, kw: kw.update(threshold=None), "jumprelu needs a per-latent threshold"),
        (lambda p, kw: kw.update(activation="gelu"), "activation must be one of"),
        (lambda p, kw: kw.update(activation="topk", k=0), "topk needs 1 <= k <= d_sae=300"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_input_is_named(change, message, backend):
    case = make_case("jumprelu", seed=8)
    params, kwargs = dict(case.params), dict(case.kwargs)
    change(params, kwargs)
    if backend == "triton":
        case, params, kwargs = Case(on_device(case.x), {}, {}, case.oracle), on_device(params), on_device(kwargs)
    with pytest.raises(ValueError, match=message):
        sae_stats(case.x, **params, **kwargs, backend=backend)


def test_reference_never_holds_tokens_by_latents(tmp_path):
    """N x F = 2^29 float32 = 2 GiB, run in a process whose peak memory must stay far below that. The peak is VmHWM:
    a child's ru_maxrss also counts the parent's size at the fork (or vfork) that preceded its exec."""
    script = """
import re, torch
from kernels.reference import sae_stats_reference
torch.manual_seed(0)
N, d, F = 1 << 14, 4, 1 << 15
x = torch.randn(N, d)
stats = sae_stats_reference(x, torch.randn(d, F), torch.zeros(F), torch.randn(F, d), torch.zeros(d),
                            activation="jumprelu", threshold=torch.full((F,), 2.5))
assert stats.l0.shape == (N,) and stats.fire_count.shape == (F,) and stats.l0.mean() > 0
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    peak_mib = int(out.stdout.split()[-1])
    assert peak_mib < 1024, f"peak RSS {peak_mib} MiB for a 2048 MiB tokens x latents matrix"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_triton_on_gpu_never_allocates_tokens_by_latents():
    N, d, F = 1 << 16, 256, 1 << 17  # N x F float32 = 32 GiB
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, d, device="cuda", generator=g, dtype=torch.bfloat16)
    W_enc = (torch.randn(d, F, device="cuda", generator=g) / d**0.5).to(torch.bfloat16)
    W_dec = (torch.randn(F, d, device="cuda", generator=g) / F**0.5).to(torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stats = sae_stats(x, W_enc, torch.zeros(F, device="cuda"), W_dec, torch.zeros(d, device="cuda"),
                      activation="jumprelu", threshold=torch.full((F,), 3.0, device="cuda"))
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < N * F * 4 / 16
    ref = sae_stats(x[:4096], W_enc, torch.zeros(F, device="cuda"), W_dec, torch.zeros(d, device="cuda"),
                    activation="jumprelu", threshold=torch.full((F,), 3.0, device="cuda"), backend="reference")
    # Random thresholds: a few of these 5e8 pre-activations lie within float32 summation error (~1e-6) of theirs and
    # may flip between the tensor-core and the reference sums; a wrong kernel is off on most tokens, not a few by 1.
    diff = (stats.l0[:4096] - ref.l0).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.01, f"{int((diff > 0).sum())} tokens' L0 differ"
    assert ref.l0.mean() > 50  # the comparison covers tokens with many active latents


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("activation, k", [("jumprelu", None), ("topk", 16)])
def test_codes_cost_one_wait_for_the_gpu(activation, k):
    """Returning the codes adds one read-back from the device (their extent) to the statistics' own: a wait per
    layout step would stall each analysis thread behind the device."""
    from conftest import device_waits

    N, d, F = 4096, 128, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, d, device="cuda", generator=g)
    W_enc, W_dec = torch.randn(d, F, device="cuda", generator=g) / d**0.5, torch.randn(F, d, device="cuda", generator=g)
    threshold = torch.full((F,), 1.0, device="cuda") if k is None else None

    def waits(return_codes: bool):
        def run():
            return sae_stats(x, W_enc, torch.zeros(F, device="cuda"), W_dec, torch.zeros(d, device="cuda"),
                             activation=activation, k=k, threshold=threshold, return_codes=return_codes)

        run()  # tuning and first-call work, before counting
        return device_waits(run)

    plain, _ = waits(False)
    with_codes, got = waits(True)
    assert len(with_codes) <= len(plain) + 1, with_codes
    assert torch.equal(got.codes.indptr.diff(), got.l0.long()) and len(got.codes.indices) == int(got.codes.indptr[-1])
    assert got.l0.mean() > (10 if k else 100)  # many codes per token


def test_scatter_kept_places_the_kept_values_as_a_masked_assignment_does():
    from kernels import scatter_kept

    g = torch.Generator().manual_seed(0)
    keep = torch.rand(6, 5, generator=g) < 0.5
    positions = torch.randperm(30, generator=g).reshape(6, 5)
    values = torch.randn(6, 5, generator=g, dtype=torch.float64)
    want = torch.full((30,), -7.0, dtype=torch.float64)
    want[positions[keep]] = values[keep]
    assert torch.equal(scatter_kept(30, keep, positions, values, -7.0), want)
    got = scatter_kept(30, keep, positions, values)  # no fill: only the kept positions are defined
    assert torch.equal(got[positions[keep]], values[keep]) and got.shape == (30,)
    empty = torch.zeros(0, dtype=torch.bool)
    assert scatter_kept(0, empty, empty.long(), empty.double(), 0.0).shape == (0,)


def test_first_compiled_call_of_a_kernel_variant_runs_alone(monkeypatch):
    """Triton's autotuner is not thread-safe: Dask's threads must not tune one kernel at once, but may run it at once
    after."""
    import threading
    import time

    import kernels.sae_triton

    running, most = [0], [0]
    guard = threading.Lock()

    def fake_stats(*args, **kwargs):
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with guard:
            running[0] -= 1

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernels.sae_triton, "sae_stats_triton", fake_stats)
    x, W_enc, W_dec = torch.zeros(4, 3), torch.zeros(3, 17), torch.zeros(17, 3)  # a shape no other test uses

    def wave() -> int:
        most[0] = 0
        start = threading.Barrier(6)

        def call():
            start.wait()
            sae_stats(x, W_enc, torch.zeros(17), W_dec, torch.zeros(3), activation="relu", backend="triton")

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return most[0]

    assert wave() == 1  # first calls: one at a time
    assert wave() > 1  # tuned: concurrent


def test_the_kernel_waits_for_the_device_asleep_before_reading_back(cuda_event_log, monkeypatch):
    """The kernel's one read-back (which tokens overflow the code buffer) follows a sleeping wait on the caller's
    stream, so that CUDA's spinning wait finds nothing left to wait for."""
    import kernels.sae_triton as triton_kernels
    from kernels import wait_for_stream

    wait_for_stream(torch.device("cuda", 2))
    assert cuda_event_log == [("made", {"blocking": True}), ("record", "stream of cuda:2"), ("wait",)]
    wait_for_stream(torch.device("cpu"))  # nothing to wait for off a GPU
    assert len(cuda_event_log) == 3
    waits = []
    monkeypatch.setattr(triton_kernels, "wait_for_stream", lambda device: waits.append(device))
    case = make_case("jumprelu", N=16, d=32, F=48)
    sae_stats(case.x, **case.params, **case.kwargs, backend="triton")
    assert waits == [case.x.device]
