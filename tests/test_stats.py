"""Dataset-wide statistics equal numpy float64 over the whole data, whatever the chunking and number of workers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import actstore
from actstore.stats import SAEParams, compute_layer_stats
from actstore.writer import StoreWriter, TextTokens
from actstore.schema import StoreSchema
from conftest import device_waits

N_IMAGES, T, D, F, TEXT_PER_IMAGE = 22, 3, 8, 24, 2


def dataset(seed: int = 0):
    """Images (layers, N, T, D) with a large mean (as residual streams have) and text tokens (layers, N*2, D)."""
    rng = np.random.default_rng(seed)
    images = (rng.standard_normal((2, N_IMAGES, T, D)) * 0.5 + rng.standard_normal(D) * 4).astype(np.float32)
    text = (rng.standard_normal((2, N_IMAGES * TEXT_PER_IMAGE, D)) + 1).astype(np.float32)
    return images, text


def write_store(path, block_images: int, prompts: list[str] | None = None,
                provenance: dict | None = None) -> None:
    """The dataset as a store of two states (0 and 5); its text tokens are words of the miniature's tokenizer (ids
    10-29, which the provenance names unless given another)."""
    images, text = dataset()
    schema = StoreSchema(layers=(0, 5), image_tokens=T, d_model=D, dtype="float32", capacity=N_IMAGES,
                         block_images=block_images, text_tokens_per_image=TEXT_PER_IMAGE)
    provenance = {"model": {"lm": "miniature"}} if provenance is None else provenance
    with StoreWriter.create(path, schema, provenance) as writer:
        for b in range(schema.blocks_for(N_IMAGES)):
            lo, hi = b * block_images, min(N_IMAGES, (b + 1) * block_images)
            k = hi - lo
            tt = TextTokens(text[:, lo * TEXT_PER_IMAGE : hi * TEXT_PER_IMAGE], np.repeat(np.arange(k), TEXT_PER_IMAGE),
                            np.tile(np.arange(TEXT_PER_IMAGE), k),
                            10 + np.arange(lo * TEXT_PER_IMAGE, hi * TEXT_PER_IMAGE) % 20)
            writer.write_block(b, images[:, lo:hi], [f"img{i}" for i in range(lo, hi)],
                               prompts[lo:hi] if prompts else None, text=tt)


def make_saes() -> dict[int, SAEParams]:
    """ReLU SAEs whose biases put zero mid-gap between pre-activations (no token sits on a decision boundary)."""
    images, text = dataset()
    g = torch.Generator().manual_seed(1)
    saes = {}
    for index, layer in enumerate((0, 5)):
        W_enc = torch.randn(D, F, generator=g) / D**0.5
        x = np.concatenate([images[index].reshape(-1, D), text[index]]).astype(np.float64)
        pre = np.sort(x @ W_enc.double().numpy(), axis=0)
        cut = int(0.8 * len(pre))  # ~20% of tokens active per latent
        gaps = pre[cut] - pre[cut - 1]
        assert gaps.min() > 1e-4
        b_enc = torch.from_numpy(-(pre[cut] + pre[cut - 1]) / 2).float()
        saes[layer] = SAEParams(W_enc, b_enc, torch.randn(F, D, generator=g) * 0.3, torch.randn(D, generator=g),
                                "relu")
    return saes


def numpy_stats(x: np.ndarray, sae: SAEParams) -> dict:
    """The definitions, in float64 over the whole token set at once."""
    x = x.astype(np.float64)
    p = {k: v.double().numpy() for k, v in (("W_enc", sae.W_enc), ("b_enc", sae.b_enc), ("W_dec", sae.W_dec),
                                            ("b_dec", sae.b_dec))}
    z = np.maximum(x @ p["W_enc"] + p["b_enc"], 0)
    x_hat = z @ p["W_dec"] + p["b_dec"]
    err = ((x - x_hat) ** 2).sum(1)
    norm_x, norm_hat = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
    l0 = (z > 0).sum(1)
    return {
        "n_tokens": len(x), "fvu": err.sum() / ((x - x.mean(0)) ** 2).sum(), "mse": err.mean(),
        "mean_rel_err": (np.sqrt(err) / norm_x).mean(), "mean_cos": ((x * x_hat).sum(1) / (norm_x * norm_hat)).mean(),
        "l0_mean": l0.mean(), "l0_hist": np.bincount(l0, minlength=F + 1), "fire_count": (z > 0).sum(0),
        "act_max": z.max(0), "act_argmax": np.where(z.max(0) > 0, z.argmax(0), -1), "z": z,
    }


def numpy_top_k(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, the k most activating tokens (activation descending, then token ascending); -1 / 0 pad."""
    top_token = np.full((z.shape[1], k), -1)
    top_act = np.zeros((z.shape[1], k))
    for j in range(z.shape[1]):
        fired = np.flatnonzero(z[:, j] > 0)
        order = fired[np.lexsort((fired, -z[fired, j]))][:k]
        top_token[j, : len(order)], top_act[j, : len(order)] = order, z[order, j]
    return top_act, top_token


def check(stats, saes) -> None:
    images, text = dataset()
    for index, layer in enumerate((0, 5)):
        for kind, x in (("image", images[index].reshape(-1, D)), ("text", text[index])):
            want = numpy_stats(x, saes[layer])
            got = stats.sel(layer=layer, kind=kind)
            for name in ("fvu", "mse", "mean_rel_err", "mean_cos", "l0_mean"):
                assert float(got[name]) == pytest.approx(want[name], rel=2e-6), (layer, kind, name)
            for name in ("n_tokens", "l0_hist", "fire_count", "act_argmax"):
                np.testing.assert_array_equal(got[name].values, want[name], err_msg=f"{layer} {kind} {name}")
            np.testing.assert_allclose(got.act_max.values, want["act_max"], rtol=1e-5)
            if kind == "image" and "image_top_latents" in stats:
                mass = want["z"].reshape(N_IMAGES, T, F).sum(1)
                m = stats.sizes["top"]
                order = np.argsort(-mass, axis=1, kind="stable")[:, :m]
                expected = np.where(np.take_along_axis(mass, order, 1) > 0, order, -1)
                np.testing.assert_array_equal(stats.image_top_latents.sel(layer=layer).values, expected,
                                              err_msg=f"{layer} image_top_latents")
            if "rank" in stats.dims:
                top_act, top_token = numpy_top_k(want["z"], stats.sizes["rank"])
                np.testing.assert_array_equal(got.top_token.values, top_token, err_msg=f"{layer} {kind} top_token")
                np.testing.assert_allclose(got.top_act.values, top_act, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    write_store(root / "b4.zarr", 4)  # 6 blocks, the last partial
    write_store(root / "b6.zarr", 6)
    return root


@pytest.mark.parametrize("store", ["b4.zarr", "b6.zarr"])
def test_stats_equal_numpy_over_the_whole_data(stores, store):
    saes = make_saes()
    stats = compute_layer_stats(actstore.open(stores / store), saes, backend="reference", scheduler="threads",
                                top_k=5, image_top=4)
    assert stats.sizes["rank"] == 5
    check(stats, saes)
    assert stats.fvu.sel(kind="image").min() > 0


def test_several_worker_processes_give_the_same_result(stores, capsys):
    from distributed import Client, LocalCluster

    saes = make_saes()
    single = compute_layer_stats(actstore.open(stores / "b4.zarr"), saes, backend="reference", scheduler="sync",
                                 progress=True)
    done = re.search(r"\[statistics\] (\d+)/(\d+) tasks \(100%\)", capsys.readouterr().err)  # ours, local schedulers
    assert done and done.group(1) == done.group(2) and int(done.group(1)) > 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        multi = compute_layer_stats(actstore.open(stores / "b4.zarr"), saes, backend="reference", scheduler=client,
                                    progress=True)
    done = re.search(r"\[statistics\] (\d+)/(\d+) tasks \(100%\)", capsys.readouterr().err)  # a cluster's, as lines
    assert done and done.group(1) == done.group(2) and int(done.group(1)) > 0
    check(multi, saes)
    # Merges are exact and in a fixed order; the float32 kernel's sums may differ in the last bits with the BLAS
    # thread count of each worker, hence float32-level agreement (counts and argmax are compared exactly above).
    for name in single.data_vars:
        np.testing.assert_allclose(multi[name].values, single[name].values, rtol=1e-5, err_msg=name)


def test_tasks_are_grouped_where_the_cluster_workers_have_a_gpu(stores, monkeypatch):
    """With a distributed client the workers, not this process, decide the task size: dask-cuda workers behind a
    client without a GPU get GPU-sized tasks."""
    import actstore.stats as stats_module
    from distributed import Client, LocalCluster

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this process: no GPU
    sizes = []
    real = stats_module.layer_partials
    monkeypatch.setattr(stats_module, "layer_partials", lambda *args: sizes.append(args[-1]) or real(*args))
    ds, saes = actstore.open(stores / "b4.zarr"), make_saes()
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        assert stats_module.default_tokens_per_task("auto", client) == 1
        monkeypatch.setattr(stats_module, "sees_gpu", lambda: True)  # what a worker with a GPU answers
        assert stats_module.default_tokens_per_task("auto", client) == stats_module.TOKENS_PER_TASK
        assert stats_module.default_tokens_per_task("reference", client) == 1
        compute_layer_stats(ds, saes, [0], backend="triton", scheduler=client)
    compute_layer_stats(ds, saes, [0], backend="triton", scheduler="sync")
    assert sizes == [stats_module.TOKENS_PER_TASK, 1]


def test_the_triton_path_gives_the_same_statistics(stores):
    saes = make_saes()
    check(compute_layer_stats(actstore.open(stores / "b6.zarr"), saes, backend="triton", scheduler="sync", top_k=3,
                              image_top=30),
          saes)


def test_wrong_sae_width_or_missing_layer_is_named(stores):
    ds = actstore.open(stores / "b4.zarr")
    saes = make_saes()
    with pytest.raises(ValueError, match=r"no SAE for layer\(s\) \[3\]"):
        compute_layer_stats(ds, saes, layers=[0, 3])
    wrong = {0: SAEParams(torch.zeros(16, F), torch.zeros(F), torch.zeros(F, 16), torch.zeros(16), "relu")}
    with pytest.raises(ValueError, match="the SAE for layer 0 has d_in=16, the store has d_model=8"):
        compute_layer_stats(ds, wrong)


def test_every_task_of_a_layer_shares_one_sae_object(stores, monkeypatch):
    """A worker must copy an SAE to its GPU once, not once per chunk: Dask has to hand every task the same object."""
    seen = []
    original = SAEParams.on

    def record(self, *args, **kwargs):
        seen.append(id(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SAEParams, "on", record)
    saes = make_saes()
    compute_layer_stats(actstore.open(stores / "b4.zarr"), saes, backend="reference", scheduler="threads",
                        tokens_per_task=1)
    assert len(seen) == 2 * 2 * 6  # 2 layers x (image + text) x 6 blocks, one task each
    assert set(seen) == {id(s) for s in saes.values()}


# b6.zarr: 4 blocks (6, 6, 6, 4 images) of 18 image tokens and 12 text tokens each, 2 layers: chunks per task
@pytest.mark.parametrize("tokens_per_task, chunks_per_task", [
    (1, [1] * 16),  # one chunk per task
    (40, [2, 2] * 2 + [3, 1] * 2),  # 40 // 18 = 2 image chunks, 40 // 12 = 3 text chunks per task
    (10**6, [4] * 4),  # every chunk of a layer and kind in one task
])
def test_tasks_of_several_chunks_give_the_same_statistics(stores, tokens_per_task, chunks_per_task, monkeypatch):
    """Chunks grouped into one task change nothing but the task count."""
    from actstore import stats as stats_module

    calls = []
    original = stats_module.chunk_partial
    monkeypatch.setattr(stats_module, "chunk_partial", lambda x, *a, **k: calls.append(len(x)) or original(x, *a, **k))
    saes = make_saes()
    got = compute_layer_stats(actstore.open(stores / "b6.zarr"), saes, backend="reference", scheduler="threads",
                              top_k=5, image_top=4, tokens_per_task=tokens_per_task)
    check(got, saes)
    assert sorted(calls) == sorted(chunks_per_task)


def test_latent_top_k_ranks_by_activation_then_token():
    """Per latent, activations descending; equal activations in token order; fewer than k leave -1 / 0."""
    from actstore.stats import latent_top_k
    from kernels.reference import SparseCodes

    # token: latents (activation)   0: 2 (0.5), 5 (3.0)   1: 2 (0.5)   2: 0 (7.0), 2 (2.0)   3: 2 (0.5), 5 (1e-30)
    codes = SparseCodes(torch.tensor([0, 2, 3, 5, 7]), torch.tensor([2, 5, 2, 0, 2, 2, 5]),
                        torch.tensor([0.5, 3.0, 0.5, 7.0, 2.0, 0.5, 1e-30]))
    top_act, top_token = latent_top_k(codes, first_token=100, d_sae=6, k=3)
    assert top_token.tolist() == [[102, -1, -1], [-1] * 3, [102, 100, 101], [-1] * 3, [-1] * 3, [100, 103, -1]]
    np.testing.assert_array_equal(top_act.numpy()[[0, 2, 5]], np.array(
        [[7.0, 0, 0], [2.0, 0.5, 0.5], [3.0, np.float32(1e-30), 0]]))


def ranked_lists(rng: np.random.Generator, latents: int, k: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, up to k of ``tokens`` with activations from a small set (so that ties occur), ranked as
    latent_top_k ranks them: activation descending, then token; empty slots (0, -1) last."""
    act, token = np.zeros((latents, k)), np.full((latents, k), -1, dtype=np.int64)
    for row in range(latents):
        n = rng.integers(0, k + 1)
        chosen = sorted(zip(-rng.choice([0.5, 1.0, 2.0], n), rng.choice(tokens, n, replace=False)))
        act[row, :n], token[row, :n] = [-a for a, _ in chosen], [t for _, t in chosen]
    return act, token


def test_merge_top_k_keeps_the_k_best_of_both_lists_in_rank_order():
    """Against a sort of each latent's union; which list comes first does not matter."""
    from actstore.stats import merge_top_k

    rng = np.random.default_rng(0)
    for k in (1, 3, 8):
        a = ranked_lists(rng, 200, k, np.arange(0, 50))
        b = ranked_lists(rng, 200, k, np.arange(50, 100))  # partials cover disjoint tokens
        act, token = merge_top_k(*a, *b)
        for row in range(200):
            union = sorted((-x, t) for x, t in zip(np.r_[a[0][row], b[0][row]], np.r_[a[1][row], b[1][row]]) if t >= 0)
            want = union[:k] + [(0.0, -1)] * (k - len(union[:k]))
            assert [(-x if t >= 0 else 0.0, t) for x, t in zip(act[row], token[row])] == want
        swapped = merge_top_k(*b, *a)
        np.testing.assert_array_equal(swapped[0], act)
        np.testing.assert_array_equal(swapped[1], token)
    empty = (np.zeros((4, 0)), np.zeros((4, 0), dtype=np.int64))
    assert merge_top_k(*empty, *empty)[0].shape == (4, 0)


def test_building_the_graph_never_tokenizes_sae_weights(stores, monkeypatch):
    """Dask tokenizes an unnamed object by pickling it: seconds per layer for a wide SAE, on every analysis."""
    from dask.tokenize import normalize_token

    def refuse(sae):
        raise AssertionError("dask tokenized an SAE's weights")

    monkeypatch.setitem(normalize_token._lookup, SAEParams, refuse)
    saes = make_saes()
    stats = compute_layer_stats(actstore.open(stores / "b4.zarr"), saes, backend="reference", scheduler="threads")
    check(stats, saes)


def test_bf16_weights_stay_close_to_float32(stores):
    saes = make_saes()
    ds = actstore.open(stores / "b6.zarr")
    exact = compute_layer_stats(ds, saes, backend="reference", scheduler="sync")
    fast = compute_layer_stats(ds, saes, backend="reference", scheduler="sync", weight_dtype="bfloat16")
    np.testing.assert_allclose(fast.fvu.values, exact.fvu.values, rtol=0.05)
    assert not np.array_equal(fast.fvu.values, exact.fvu.values)  # the weights really were rounded
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        compute_layer_stats(ds, saes, weight_dtype="float8")


def random_sae(seed: int, d: int = 512, f: int = 4096) -> SAEParams:
    g = torch.Generator().manual_seed(seed)
    return SAEParams(torch.randn(d, f, generator=g), torch.zeros(f), torch.randn(f, d, generator=g), torch.zeros(d),
                     "relu")


def test_threads_that_start_together_share_one_device_copy():
    """A worker's threads start a layer's chunks at once; they must wait for one copy of the SAE, not make one each."""
    import pickle
    import threading

    sae = random_sae(0)
    start, copies = threading.Barrier(8), []

    def fetch():
        start.wait()
        copies.append(sae.on(torch.device("cpu"), torch.bfloat16))

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in copies}) == 1
    assert copies[0].W_enc.dtype == torch.bfloat16 and torch.equal(copies[0].W_enc, sae.W_enc.bfloat16())
    clone = pickle.loads(pickle.dumps(sae))  # what a distributed worker receives: a new SAE, with its own copy
    assert torch.equal(clone.W_enc, sae.W_enc)
    assert clone.on(torch.device("cpu"), torch.bfloat16) is not copies[0]


def test_device_copies_beyond_the_budget_are_dropped_oldest_first(monkeypatch):
    from actstore.stats import DEVICE_COPIES

    cpu = torch.device("cpu")
    saes = [random_sae(seed) for seed in range(3)]
    one = saes[0].to(cpu, torch.bfloat16).nbytes
    monkeypatch.setenv("ACTSTORE_SAE_COPY_BYTES", str(int(2.5 * one)))
    first = [s.on(cpu, torch.bfloat16) for s in saes[:2]]
    assert DEVICE_COPIES.held(cpu) >= 2 * one
    assert saes[0].on(cpu, torch.bfloat16) is first[0]  # cached; now the most recently used
    saes[2].on(cpu, torch.bfloat16)  # a third does not fit: the least recently used (saes[1]) goes
    assert DEVICE_COPIES.held(cpu) <= 2.5 * one
    assert saes[0].on(cpu, torch.bfloat16) is first[0]
    assert saes[1].on(cpu, torch.bfloat16) is not first[1]


def test_each_thread_runs_its_chunks_on_its_own_stream(monkeypatch):
    """Dask's threads share a GPU: each must queue its chunks on a stream of its own, kept across chunks, so that its
    read-back waits for its own work and not for every other thread's."""
    import contextlib
    import threading

    from actstore.devices import thread_stream

    made, entered = [], []

    class Stream:
        def __init__(self, device: int) -> None:
            self.device = device
            made.append(self)

    @contextlib.contextmanager
    def stream(s):
        entered.append((threading.get_ident(), s))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)

    together = threading.Barrier(4)  # all alive at once, so that no thread id is reused

    def chunks():
        for _ in range(3):
            with thread_stream(torch.device("cuda", 1)):
                pass
        together.wait()

    threads = [threading.Thread(target=chunks) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 4 and all(s.device == 1 for s in made)
    by_thread: dict[int, set[int]] = {}
    for ident, s in entered:
        by_thread.setdefault(ident, set()).add(id(s))
    assert len(entered) == 12 and all(len(s) == 1 for s in by_thread.values())
    assert len(set().union(*by_thread.values())) == 4
    with thread_stream(torch.device("cpu")):  # nothing to do on a CPU
        pass
    assert len(entered) == 12


def test_a_thread_waits_for_its_stream_asleep(cuda_event_log):
    """Waiting for a chunk's kernels with a blocking event, on the waiting thread's own stream."""
    from actstore.devices import wait_for_stream

    wait_for_stream(torch.device("cuda", 1))
    assert cuda_event_log == [("made", {"blocking": True}), ("record", "stream of cuda:1"), ("wait",)]


def test_packed_bytes_unpack_to_every_tensor_exactly():
    """A task's sums cross to the host as one packed buffer: every dtype, shape and value comes back, in order."""
    from actstore.devices import pack_bytes, unpack_bytes

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randint(-5, 5, (7,), generator=g, dtype=torch.int32),
               torch.randn((), generator=g, dtype=torch.float64),
               torch.rand(3, 4, generator=g) > 0.5, torch.randn(5, 2, generator=g, dtype=torch.float64),
               torch.zeros(6, 0, dtype=torch.int64), torch.randint(0, 9, (3,), generator=g, dtype=torch.uint8),
               torch.randn(2, 3, generator=g).t(), torch.randint(-9, 9, (4, 2), generator=g)]
    packed = pack_bytes(tensors)
    assert packed.dtype == torch.uint8 and packed.numel() == sum(t.numel() * t.element_size() for t in tensors)
    host = unpack_bytes(packed.numpy(), tensors)
    for t, h in zip(tensors, host):
        assert h.shape == tuple(t.shape) and h.dtype == t.numpy().dtype
        np.testing.assert_array_equal(h, t.numpy())
        assert h.ctypes.data % h.itemsize == 0  # aligned: numpy's fast paths apply
    with pytest.raises(ValueError, match="packed buffer holds"):
        unpack_bytes(packed.numpy()[:-1], tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_tasks_sums_cross_in_one_copy():
    """to_host reads GPU tensors back in one device-to-host copy, with the values .cpu() gives."""
    from actstore.devices import to_host

    tensors = [torch.randn(5, device="cuda", dtype=torch.float64), torch.arange(7, device="cuda", dtype=torch.int32),
               torch.randn((), device="cuda"), torch.ones(3, 2, device="cuda", dtype=torch.int64)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        host = to_host(tensors)
    assert sum(e.count for e in prof.key_averages() if e.key == "cudaMemcpyAsync") == 1
    for t, h in zip(tensors, host):
        np.testing.assert_array_equal(h, t.cpu().numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_top_k_and_image_top_wait_for_the_gpu_no_more_than_the_codes_do(stores):
    """The full analysis (top-k examples, image top latents) adds no wait of its own to the kernel's codes: beyond
    those, only the one read-back of the sums."""
    from actstore.bfloat16 import to_torch
    from actstore.stats import chunk_partial
    from kernels import sae_stats

    ds = actstore.open(stores / "b4.zarr")
    block = np.asarray(ds.image_resid.data.blocks[0, 0])
    sae = make_saes()[0]
    want = chunk_partial(block, sae, 0, backend="reference", top_k=4, image_top=3)
    chunk_partial(block, sae, 0, top_k=4, image_top=3)  # copies and tuning once, before counting
    on = sae.on(torch.device("cuda"))
    x = to_torch(np.ascontiguousarray(block.reshape(-1, block.shape[-1]))).cuda().float()
    codes_waits, _ = device_waits(sae_stats, x, on.W_enc, on.b_enc, on.W_dec, on.b_dec, activation=on.activation,
                                  threshold=on.threshold, k=on.k, apply_b_dec_to_input=on.apply_b_dec_to_input,
                                  return_codes=True)
    waits, got = device_waits(chunk_partial, block, sae, 0, top_k=4, image_top=3)
    assert len(waits) <= len(codes_waits) + 1, waits
    np.testing.assert_array_equal(got.top_token, want.top_token)
    np.testing.assert_array_equal(got.image_top, want.image_top)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_chunk_waits_for_the_gpu_at_most_twice(stores):
    """One read-back for all of a chunk's sums, plus the kernel's check for tokens beyond its code buffer: every
    other wait would stall the thread behind the device."""
    from actstore.stats import chunk_partial

    ds = actstore.open(stores / "b4.zarr")
    block = np.asarray(ds.image_resid.data.blocks[0, 0])
    sae = make_saes()[0]
    want = chunk_partial(block, sae, 0, backend="reference")
    chunk_partial(block, sae, 0)  # the SAE's copy to the GPU and the kernels' tuning happen once, before counting
    waits, got = device_waits(chunk_partial, block, sae, 0)
    assert len(waits) <= 2, waits
    np.testing.assert_array_equal(got.l0_hist, want.l0_hist)
    assert got.sq_err == pytest.approx(want.sq_err, rel=1e-5)
