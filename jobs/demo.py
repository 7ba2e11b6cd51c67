"""``actstore demo``: the main job. The miniature study end to end on a CPU: build the tiny ViT and LM (once,
cached), train the linear adapter, harvest image- and text-token residuals of every layer into a store, and show
the store through ``info`` and xarray. (SAE training, analysis and the report come with the analysis issue.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import actstore
from actstore.integrity import store_info
from jobs.harvest import HarvestConfig, run_harvest
from jobs.train_adapter import TrainConfig, train

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def run_demo(out: str = "runs/demo", config: str | Path = DEMO_CONFIG) -> Path:
    """Run the miniature study under ``out``; returns the store's path."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    adapter = root / "adapter" / "adapter"
    if (adapter / "adapter.safetensors").exists():
        print(f"[demo] 1-2/3 using the trained adapter in {adapter} (delete it to retrain)")
    else:
        print("[demo] 1/3 building the tiny ViT and LM (cached after the first run) and training the adapter")
        cfg = TrainConfig.from_yaml(config)
        cfg.out = str(root / "adapter")
        result = train(cfg)
        print(f"[demo] 2/3 adapter trained: held-out caption loss {result['eval_loss']:.3f}")
    store = root / "activations.zarr"
    if store.exists():
        shutil.rmtree(store)  # the demo rebuilds its store, so a retrained adapter never meets an old one
    print(f"[demo] 3/3 harvesting every layer's residuals at image and text tokens into {store}")
    harvest = HarvestConfig.from_yaml(config)
    harvest.adapter = str(adapter)
    run_harvest(harvest, str(store))
    info = store_info(store)
    print(f"[demo] store: {info['images']} images, {info['text_tokens']} text tokens, "
          f"{info['bytes_logical'] / 2**20:.1f} MiB logical, compression ratio {info['compression_ratio']:.2f}; "
          f"integrity: {info['verdict']}")
    ds = actstore.open(store)
    image_norm = np.linalg.norm(ds.image_resid.values.astype(np.float32), axis=-1).mean(axis=(1, 2))
    text_norm = np.linalg.norm(ds.text_resid.values.astype(np.float32), axis=-1).mean(axis=1)
    print("[demo] mean residual norm by layer (image tokens / text tokens):")
    for state, a, b in zip(ds.layer.values, image_norm, text_norm):
        print(f"         state {state}: {a:7.2f} / {b:7.2f}")
    print(f"[demo] done. Query it: python -c \"import actstore; print(actstore.open('{store}'))\"")
    return store
