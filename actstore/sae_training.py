"""Train per-layer SAEs with sae-lens' own trainer, fed from a store's text-token residuals (the LM's own
distribution), and save them as sae-lens folders plus a suite YAML that ``actstore analyze`` reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import xarray as xr
import yaml


@dataclass
class SAETrainingSpec:
    """Width and training budget of the SAEs."""

    d_sae: int = 256
    l1_coefficient: float = 2.0
    lr: float = 3e-3
    batch_size: int = 256
    total_samples: int = 120_000
    seed: int = 0


def store_batches(ds: xr.Dataset, layer: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of one layer's text-token residuals (float32), read once into memory.

    The miniature's per-layer text activations are a few MB; a real suite is trained on the LM's pretraining text,
    not through this helper."""
    tokens = torch.from_numpy(ds.text_resid.sel(layer=layer).values.astype(np.float32))
    if len(tokens) < batch_size:
        raise ValueError(f"layer {layer} has {len(tokens)} text tokens, fewer than one batch of {batch_size}")
    g = torch.Generator().manual_seed(seed + layer)
    while True:
        order = torch.randperm(len(tokens), generator=g)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield tokens[order[start : start + batch_size]]


def train_layer_sae(ds: xr.Dataset, layer: int, spec: SAETrainingSpec, out: Path) -> Path:
    """Train a standard (ReLU, L1) SAE on one layer's text tokens with sae-lens; save it with its hook name."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(spec.seed + layer)
    d_model = ds.sizes["d_model"]
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=d_model, d_sae=spec.d_sae, l1_coefficient=spec.l1_coefficient, dtype="float32", device="cpu",
        apply_b_dec_to_input=True,
    ))
    cfg = SAETrainerConfig(total_training_samples=spec.total_samples, train_batch_size_samples=spec.batch_size,
                           lr=spec.lr, lr_end=spec.lr, device="cpu", n_batches_for_norm_estimate=10)
    trained = SAETrainer(cfg, sae, store_batches(ds, layer, spec.batch_size, spec.seed)).fit()
    # our state s = residual after s blocks: TransformerLens' blocks.{s-1}.hook_resid_post, or blocks.0 pre for s=0
    trained.cfg.metadata.hook_name = "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"
    path = out / f"state_{layer}"
    save = trained.save_inference_model if hasattr(trained, "save_inference_model") else trained.save_model
    save(str(path))
    return path


def train_suite(store: str | Path, out: str | Path, name: str, spec: SAETrainingSpec = SAETrainingSpec(),
                log: Callable[[str], None] = print) -> Path:
    """One SAE per layer of ``store``; returns the suite YAML."""
    import actstore

    ds = actstore.open(store)
    out = Path(out)
    entries = []
    for layer in (int(x) for x in ds.layer.values):
        path = train_layer_sae(ds, layer, spec, out)
        entries.append({"source": "local", "path": path.name})
        log(f"[saes] trained the SAE for state {layer} ({spec.d_sae} latents) -> {path}")
    suite = out / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": name, "saes": entries}))
    return suite
