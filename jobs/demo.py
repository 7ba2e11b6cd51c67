"""``actstore demo``: the main job. The miniature study end to end on a CPU: build the tiny ViT and LM (once,
cached), train the linear adapter, harvest image- and text-token residuals of every layer into a store, train one
SAE per layer with sae-lens on the store's text tokens, analyse image vs text tokens layer by layer (statistics, latent
descriptions derived from text tokens, semantic alignment), and write the report."""

from __future__ import annotations

import shutil
from pathlib import Path

from actstore.integrity import store_info
from actstore.report import write_report
from actstore.sae_training import train_suite
from jobs.analyze import run_analysis
from jobs.harvest import HarvestConfig, run_harvest
from jobs.train_adapter import TrainConfig, train

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def run_demo(out: str = "runs/demo", config: str | Path = DEMO_CONFIG) -> Path:
    """Run the miniature study under ``out``; returns the store's path."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    adapter = root / "adapter" / "adapter"
    if (adapter / "adapter.safetensors").exists():
        print(f"[demo] 1-2/6 using the trained adapter in {adapter} (delete it to retrain)")
    else:
        print("[demo] 1/6 building the tiny ViT and LM (cached after the first run) and training the adapter")
        cfg = TrainConfig.from_yaml(config)
        cfg.out = str(root / "adapter")
        result = train(cfg)
        print(f"[demo] 2/6 adapter trained: held-out caption loss {result['eval_loss']:.3f}")
    store = root / "activations.zarr"
    if store.exists():
        shutil.rmtree(store)  # the demo rebuilds its store, so a retrained adapter never meets an old one
    print(f"[demo] 3/6 harvesting every layer's residuals at image and text tokens into {store}")
    harvest = HarvestConfig.from_yaml(config)
    harvest.adapter = str(adapter)
    run_harvest(harvest, str(store))
    info = store_info(store)
    print(f"[demo] store: {info['images']} images, {info['text_tokens']} text tokens, "
          f"{info['bytes_logical'] / 2**20:.1f} MiB logical, compression ratio {info['compression_ratio']:.2f}; "
          f"integrity: {info['verdict']}")
    saes = root / "saes"
    suite = saes / "suite.yaml"
    if suite.exists():
        print(f"[demo] 4/6 using the SAEs in {saes} (delete the folder to retrain)")
    else:
        print("[demo] 4/6 training one SAE per layer with sae-lens on the store's text tokens")
        train_suite(store, saes, "demo-saes")
    print("[demo] 5/6 analysing image vs text tokens per layer with Dask")
    stats = run_analysis(str(store), str(suite), log=lambda *_: None)
    print("[demo]   state | FVU image   text | L0 image  text | cosine image  text | alignment random")
    for layer in stats.layer.values:
        row = stats.sel(layer=layer)
        print(f"[demo]   {int(layer):5d}"
              f" | {float(row.fvu.sel(kind='image')):9.3f} {float(row.fvu.sel(kind='text')):6.3f}"
              f" | {float(row.l0_mean.sel(kind='image')):8.1f} {float(row.l0_mean.sel(kind='text')):5.1f}"
              f" | {float(row.mean_cos.sel(kind='image')):12.3f} {float(row.mean_cos.sel(kind='text')):5.3f}"
              f" | {float(row.alignment):9.3f} {float(row.alignment_baseline):6.3f}")
    report = write_report(store, root / "report")
    print(f"[demo] 6/6 report: {report / 'report.html'} (figures and report.md beside it)")
    print(f"[demo] done. Store: {store} (xarray: actstore.open('{store}')); statistics: "
          f"actstore.stats.open_stats('{store}', 'demo-saes')")
    return store
