"""Shared helpers: small schemas and deterministic per-block data, so any writer can be checked against any other."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Triton decides interpreted vs compiled when its own library functions (tl.cumsum...) are decorated, at import:
    # import it now, so a test that later unsets the variable (the demo's) cannot leave them compiled.
    import triton  # noqa: E402,F401

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from actstore.schema import DTYPES, StoreSchema  # noqa: E402
from actstore.writer import TextTokens  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, build the miniature once in the controller before the workers start, not in every worker
    at once: a build takes about a minute of both cores of a 2-core machine."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        from actstore.miniature import build_miniature

        build_miniature()


def small_schema(**overrides) -> StoreSchema:
    """A store small enough for tests: 3 layers, 5 image tokens, d_model 12, 4-image blocks, 3 text tokens/image."""
    kwargs = dict(layers=(0, 1, 2), image_tokens=5, d_model=12, capacity=16, block_images=4, text_tokens_per_image=3)
    kwargs.update(overrides)
    return StoreSchema(**kwargs)


def block_data(schema: StoreSchema, block: int, n: int | None = None):
    """Deterministic activations, ids and text tokens of ``block`` (``n`` images, default a full block)."""
    n = schema.block_images if n is None else n
    rng = np.random.default_rng(1000 + block)
    dtype = DTYPES[schema.dtype]
    shape = (len(schema.layers), n, schema.image_tokens, schema.d_model)
    # Wide dynamic range, so that a lossy path would show up in a bit-exact comparison.
    images = (rng.standard_normal(shape) * np.exp(rng.uniform(-8, 8, shape))).astype(dtype)
    ids = [f"img-{block}-{i}" for i in range(n)]
    prompts = [f"prompt {block}/{i}" for i in range(n)]
    m = max(0, n * schema.text_tokens_per_image - 1)  # one slot short of full, so padding is exercised
    text = None
    if schema.text_tokens_per_image:
        text = TextTokens(
            resid=rng.standard_normal((len(schema.layers), m, schema.d_model)).astype(dtype),
            image=np.sort(rng.integers(0, n, m)),
            position=rng.integers(0, 50, m),
            token_id=rng.integers(0, 1000, m),
        )
    return images, ids, prompts, text


def write_blocks(writer, blocks, n_last: int | None = None) -> None:
    """Write the given blocks with :func:`block_data` (the last one with ``n_last`` images if given)."""
    blocks = list(blocks)
    for i, b in enumerate(blocks):
        n = n_last if (n_last is not None and i == len(blocks) - 1) else None
        images, ids, prompts, text = block_data(writer.schema, b, n)
        writer.write_block(b, images, ids, prompts, text)


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a float array, so comparisons are bit-exact (NaN payloads and -0.0 included)."""
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def damage_file(path: Path, damage: str) -> None:
    """Damage a stored file as a disk or a cut-off copy would: ``"bitflip"`` flips one bit in its middle,
    ``"truncate"`` keeps its first third."""
    data = bytearray(path.read_bytes())
    if damage == "bitflip":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        data = data[:len(data) // 3]
    else:
        raise ValueError(f"unknown damage {damage!r}")
    path.write_bytes(bytes(data))


def record_gets(monkeypatch: pytest.MonkeyPatch, store_class: type) -> list[str]:
    """The keys zarr asks ``store_class`` for from now until ``monkeypatch.undo()``, in order."""
    asked: list[str] = []
    real_get = store_class.get

    async def get(self, key, *args, **kwargs):
        asked.append(key)
        return await real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(store_class, "get", get)
    return asked


@pytest.fixture
def store_path(tmp_path):
    """A fresh store location."""
    return tmp_path / "store.zarr"


@pytest.fixture(scope="session")
def miniature() -> dict:
    """The embedded miniature's local model paths (built once per machine, cached)."""
    from actstore.miniature import build_miniature

    return build_miniature()


@pytest.fixture
def cuda_event_log(monkeypatch):
    """Fake CUDA events and streams, so that GPU waiting code runs on a CPU: returns the log of what was done with
    them (("made", kwargs), ("record", stream), ("wait",))."""
    log: list = []

    class Event:
        def __init__(self, **kwargs) -> None:
            log.append(("made", kwargs))

        def record(self, stream) -> None:
            log.append(("record", stream))

        def synchronize(self) -> None:
            log.append(("wait",))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    return log


@pytest.fixture(scope="session")
def tiny_vlm(miniature):
    """An AdapterVLM over the miniature, with a fresh (untrained) adapter."""
    from actstore.models import AdapterVLM

    torch.manual_seed(0)
    return AdapterVLM.from_pretrained(miniature["vision"], miniature["lm"])


def hub_snapshot(cache: Path, repo_id: str, commit: str, *, main: bool = True) -> Path:
    """The (new, empty) folder of ``repo_id`` at ``commit`` in a Hugging Face hub cache laid out as huggingface_hub
    lays it out, so the real loading code finds it offline; ``main``: the main branch points at ``commit``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


def png_cells(rows: list[dict]) -> list[dict]:
    """The world rows' images as a parquet image column's cells (PNG bytes)."""
    import io

    from PIL import Image

    cells = []
    for r in rows:
        buf = io.BytesIO()
        Image.fromarray(r["image"]).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    return cells


def parquet_with_a_corrupt_image(path) -> None:
    """Six world images and captions in a parquet file; row ex2's image bytes are not an image."""
    world_parquet(path, 6, seed=9, prefix="ex", undecodable=(2,))


def world_parquet(path: Path, n: int, seed: int = 4, prefix: str = "w",
                  undecodable: Sequence[int] = ()) -> list[str]:
    """``n`` world images with captions in a parquet file, ids ``prefix0`` ...; returns the ids. The rows
    ``undecodable`` hold bytes that are not an image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actstore import world

    rows = world.generate(n, seed=seed)
    ids = [f"{prefix}{i}" for i in range(n)]
    images = png_cells(rows)
    for row in undecodable:
        images[row] = {"bytes": b"\x89PNG not really an image", "path": None}
    pq.write_table(pa.table({"id": ids, "image": images, "caption": [r["caption"] for r in rows]}), path)
    return ids


def hub_dataset_cache(cache: Path, repo: str, parquet: Path, commit: str) -> None:
    """Put the table of ``parquet`` into a datasets cache as ``repo`` at ``commit``, prepared as an online load
    leaves it (<namespace>___<name>/<config>/<version>/<commit>/<name>-<split>.arrow)."""
    import datasets

    builder = datasets.load_dataset_builder("parquet", data_files={"train": str(parquet)},
                                            cache_dir=str(cache.parent / f"prepared-{commit[:8]}"))
    builder.download_and_prepare()
    namespace, name = repo.split("/")
    folder = cache / f"{namespace}___{name}" / "default" / "0.0.0" / commit
    shutil.copytree(builder.cache_dir, folder)
    for arrow in folder.glob("parquet-*"):
        arrow.rename(folder / arrow.name.replace("parquet-", f"{name}-", 1))


def device_waits(fn, *args, **kwargs) -> tuple[list[str], object]:
    """The device synchronisations torch reports while ``fn`` runs (CUDA), and its result."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)], result


def run_quick_benchmark(name: str, tmp_path: Path, *args: str, timeout: int = 600) -> dict:
    """Run ``benchmarks/<name>.py --quick`` (with ``args``) in a fresh process, as a user would; its JSON report."""
    import json
    import subprocess
    import sys

    out = tmp_path / f"{name}.json"
    script = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    subprocess.run([sys.executable, str(script), "--quick", *args, "--out", str(out)], check=True, timeout=timeout)
    return json.loads(out.read_text())
