"""``actstore demo``: the main job. Until the model and harvester land, it builds the store the miniature study
will fill, with synthetic activations (clearly marked as such), and shows it through ``info`` and xarray."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import actstore
from actstore.integrity import store_info
from actstore.schema import StoreSchema
from actstore.writer import StoreWriter, TextTokens

# Shapes of the embedded miniature: a tiny LM (4 blocks -> 5 residual states), 16 image tokens, d_model 64.
DEMO_SCHEMA = StoreSchema(
    layers=tuple(range(5)), image_tokens=16, d_model=64, capacity=256, block_images=32, text_tokens_per_image=8
)


def build_synthetic_store(path: Path, schema: StoreSchema = DEMO_SCHEMA, n_images: int = 256, seed: int = 0) -> None:
    """Write ``n_images`` images of random bf16 activations (and text tokens) into a new store at ``path``."""
    rng = np.random.default_rng(seed)
    provenance = {"model": "synthetic (placeholder until the harvester lands)", "dataset": "synthetic"}
    with StoreWriter.create(path, schema, provenance, overwrite=True) as writer:
        for block in writer.missing_blocks(n_images):
            images = writer.block_images(block)
            n = min(len(images), n_images - images.start)
            resid = rng.standard_normal((len(schema.layers), n, schema.image_tokens, schema.d_model), dtype=np.float32)
            tokens = schema.text_tokens_per_image
            text = TextTokens(
                resid=rng.standard_normal((len(schema.layers), n * tokens, schema.d_model), dtype=np.float32).astype(
                    schema.numpy_dtype
                ),
                image=np.repeat(np.arange(n), tokens),
                position=np.tile(np.arange(tokens) + schema.image_tokens + 1, n),
                token_id=rng.integers(0, 100, n * tokens),
            )
            ids = [f"synthetic-{i:05d}" for i in range(images.start, images.start + n)]
            writer.submit_block(block, resid.astype(schema.numpy_dtype), ids, ["Describe the image."] * n, text)


def run_demo(out: str = "runs/demo") -> Path:
    """Build the demo store under ``out`` and print what it holds."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "activations.zarr"
    if path.exists():
        shutil.rmtree(path)
    print(f"[demo] writing a synthetic store of the miniature's shape to {path}")
    build_synthetic_store(path)
    info = store_info(path)
    print(f"[demo] {info['images']} images, {info['blocks_complete']}/{info['blocks_total']} blocks, "
          f"{info['bytes_logical'] / 2**20:.1f} MiB logical, ratio {info['compression_ratio']:.2f}")
    print(f"[demo] integrity: {info['verdict']}")
    ds = actstore.open(path)
    mean_norm = float(np.linalg.norm(ds.image_resid.sel(layer=2).isel(image=0).values.astype(np.float32), axis=-1).mean())
    print(f"[demo] xarray: ds.image_resid.sel(layer=2).isel(image=0) -> mean token norm {mean_norm:.2f}")
    print("[demo] placeholder: the model, harvester and analysis issues replace the synthetic activations with "
          "the miniature VLM's residual stream and add the SAE report")
    return path
