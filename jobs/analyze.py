"""Analyse a store with an SAE suite: per layer and token kind, reconstruction error, sparsity and latent firing.

    actstore analyze STORE --saes SUITE.yaml [--scheduler ADDRESS | --scheduler local] [--layers 4,8,12]

Without ``--scheduler`` Dask's threaded scheduler runs in this process; ``local`` starts a
``distributed.LocalCluster``; an address (``tcp://host:8786``) uses an existing cluster, e.g. one started with
``dask scheduler`` / ``dask worker`` or with dask-cuda's ``dask cuda worker`` (one worker per GPU: each task's kernel
then runs on that worker's GPU). Results go into the store under ``analysis/<suite name>``; each finished layer is
kept under ``analysis_partial/<suite name>`` until then, so a rerun after a crash computes only the missing layers;
a rerun after a finished analysis with only descriptions added to the suite reuses every computed layer, and one
that would save the same result writes nothing.
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import xarray as xr

import actstore
from actstore.descriptions import alignment_score, suite_descriptions
from actstore.errors import IncompleteAnalysisError
from actstore.saes import SAESuite, load_suite
from actstore.stats import (
    TOKENS_PER_TASK,
    WEIGHT_DTYPES,
    checkpointed_layers,
    compute_layer_stats,
    load_layer_checkpoint,
    open_stats,
    remove_checkpoints,
    save_layer_checkpoint,
    save_stats,
)


def run_analysis(store: str, suite_path: str, *, layers: list[int] | None = None, scheduler: Any = None,
                 backend: str = "auto", weight_dtype: str = "float32", top_k: int = 8, top_latents: int = 5,
                 tokens_per_task: int | None = None, log: Callable[..., None] = print,
                 storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Compute and save the suite's statistics, latent descriptions and per-layer semantic alignment on the store;
    returns them. ``storage_options`` are fsspec's for a URL (as ``actstore.open`` takes them)."""
    suite = load_suite(suite_path)
    options = {"storage_options": storage_options}
    ds = actstore.open(store, **options)
    suite.check_store(ds.sizes["d_model"], [int(x) for x in ds.layer.values])
    layers = sorted(layers or suite.saes)
    unknown = [x for x in layers if x not in suite.saes]
    if unknown:  # before any work: a typo in --layers should not surface after the first layers ran
        raise ValueError(f"--layers asks for state(s) {unknown}, which suite {suite.name!r} has no SAE for; "
                         f"it has {sorted(suite.saes)}")
    log(f"[analyze] {store}: suite {suite.name!r}, layers {layers}, "
        f"{ds.sizes['image']} images, {ds.sizes.get('text_token', 0)} text tokens")
    # Layer by layer, each kept in the store when done: a rerun after a crash computes only the missing layers, and a
    # rerun after a finished analysis (say, with Neuronpedia descriptions added to the suite) only the layers the saved
    # result lacks. The fingerprint makes a rerun with other SAEs, settings or a grown store start afresh.
    sources = {str(k): v for k, v in suite.sources.items()}
    fingerprint = statistics_fingerprint(suite, ds, backend=backend, weight_dtype=weight_dtype, top_k=top_k,
                                         image_top=top_latents)
    saved = saved_statistics(store, suite.name, fingerprint, **options)
    computed = saved.drop_vars([v for v in DERIVED if v in saved]) if saved is not None else None
    per_layer, reused = [], []
    for i, layer in enumerate(layers):
        where = f"state {layer} ({i + 1}/{len(layers)})"
        if computed is not None and layer in computed.layer.values:
            done = computed.sel(layer=[layer])
            reused.append(done)
            log(f"[analyze] {where}: kept from the saved analysis")
        elif (done := load_layer_checkpoint(store, suite.name, layer, fingerprint, **options)) is not None:
            log(f"[analyze] {where}: kept from an interrupted run")
        else:
            log(f"[analyze] {where}")
            done = compute_layer_stats(ds, suite.saes, [layer], backend=backend, scheduler=scheduler,
                                       weight_dtype=weight_dtype, top_k=top_k, image_top=top_latents, progress=True,
                                       tokens_per_task=tokens_per_task)
            save_layer_checkpoint(store, suite.name, layer, done, fingerprint, **options)
        done.attrs.clear()  # the fingerprint; the combined result gets its own attributes below
        per_layer.append(done)
    # A run on some layers adds to the saved analysis of the others instead of replacing it; where that save was
    # stopped, to the layers it had kept.
    others = other_layers(store, suite.name, fingerprint, computed, layers, **options)
    if computed is not None:
        reused += others
    per_layer = sorted(per_layer + others, key=lambda part: int(part.layer.values[0]))
    stats = xr.concat(per_layer, dim="layer", combine_attrs="drop")
    descriptions, described_by = suite_descriptions(suite, stats, ds)
    for why_not in sorted({v for v in described_by.values() if v.startswith("none: ")}):
        log(f"[analyze] warning: no latent descriptions ({why_not[len('none: '):]}); add Neuronpedia exports to the "
            "suite, or make the tokenizer loadable, and rerun (the computed layers are reused)")
    stats["description"] = (("layer", "latent"), descriptions)  # object strings: zarr v3's variable-length UTF-8
    prompts = ds.prompt.values
    if len(set(prompts.tolist())) == 1 and len(prompts) > 1:
        log(f"[analyze] warning: every image has the prompt {prompts[0]!r}, so the alignment score compares latent "
            "descriptions with that prompt, not with what each image shows; harvest with prompt '{caption}' to score "
            "against captions")
    scores = [alignment_score(stats.image_top_latents.sel(layer=layer).values, descriptions[i], prompts)
              for i, layer in enumerate(stats.layer.values)]
    stats["alignment"] = ("layer", [s for s, _ in scores])
    stats["alignment_baseline"] = ("layer", [b for _, b in scores])
    stats.attrs["description_sources"] = json.dumps({str(k): v for k, v in described_by.items()})
    stats.attrs["suite_path"] = str(Path(suite_path).resolve())  # the report's heat maps reload the SAEs from it
    stats.attrs.update({"suite": suite.name, "store": str(store), "computed": datetime.now(timezone.utc).isoformat(),
                        "sources": json.dumps(sources), "fingerprint": fingerprint,
                        "actstore_version": actstore.__version__})
    if saved is not None and same_result(saved, stats):
        log("[analyze] the saved analysis is up to date: nothing to write")
        stats = saved
    else:
        # The save below rewrites analysis/<suite> in place: the layers it reuses are kept first, so that a run
        # stopped while saving loses no computed layer (the rerun finds every one kept).
        for done in reused:
            save_layer_checkpoint(store, suite.name, int(done.layer.values[0]), done, fingerprint, **options)
        save_stats(store, suite.name, stats, **options)
    remove_checkpoints(store, suite.name, **options)
    for layer in stats.layer.values:
        row = stats.sel(layer=layer)
        log("[analyze] state {:>3}: FVU image {:.3f} / text {:.3f}, L0 image {:.1f} / text {:.1f}, "
            "alignment {:.3f} (random {:.3f})".format(
                int(layer), *[float(row.fvu.sel(kind=k)) if k in row.kind else float("nan") for k in ("image", "text")],
                *[float(row.l0_mean.sel(kind=k)) if k in row.kind else float("nan") for k in ("image", "text")],
                float(row.alignment), float(row.alignment_baseline)))
    log(f"[analyze] saved to {store}/analysis/{suite.name}")
    return stats


# Suite-entry keys that name latents but do not change the statistics: adding them reuses the computed layers.
DESCRIPTION_KEYS = ("descriptions", "neuronpedia_sae_id")
# What an analysis adds to the statistics of its layers, recomputed on every run.
DERIVED = ("description", "alignment", "alignment_baseline")


def statistics_fingerprint(suite: SAESuite, ds: xr.Dataset, **settings: Any) -> str:
    """What a layer's statistics depend on: each SAE (where it came from and a digest of its weights, so that an SAE
    retrained into the same folder is not mistaken for the old one), the settings and the store's extent."""
    saes = {str(state): {"source": {k: v for k, v in suite.sources.get(state, {}).items() if k not in DESCRIPTION_KEYS},
                         "weights": sae.digest()} for state, sae in suite.saes.items()}
    return json.dumps({"saes": saes, **settings, "images": ds.sizes["image"],
                       "text_tokens": ds.sizes.get("text_token", 0)}, sort_keys=True, default=str)


def saved_statistics(store: str, name: str, fingerprint: str, *,
                     storage_options: dict[str, Any] | None = None) -> xr.Dataset | None:
    """The finished analysis with this fingerprint, else None."""
    try:
        # the attributes first: a stale analysis is not worth reading
        saved = open_stats(store, name, load=False, storage_options=storage_options)
    except (FileNotFoundError, KeyError, ValueError, OSError, IncompleteAnalysisError):
        return None
    if saved.attrs.get("fingerprint") != fingerprint:
        return None
    return saved.load()


def other_layers(store: str, name: str, fingerprint: str, saved: xr.Dataset | None,
                 layers: list[int], *, storage_options: dict[str, Any] | None = None) -> list[xr.Dataset]:
    """Statistics of layers outside ``layers`` that belong in the result: those of the saved analysis, or, with none
    saved, those kept with this fingerprint."""
    if saved is not None:
        return [saved.sel(layer=[x]) for x in saved.layer.values if int(x) not in layers]
    options = {"storage_options": storage_options}
    kept = [load_layer_checkpoint(store, name, x, fingerprint, **options)
            for x in checkpointed_layers(store, name, **options) if x not in layers]
    return [part for part in kept if part is not None]


def same_result(saved: xr.Dataset, stats: xr.Dataset) -> bool:
    """Whether ``stats`` holds what ``saved`` does (the time it was computed aside)."""
    def without_time(ds: xr.Dataset) -> xr.Dataset:
        ds = ds.copy()
        ds.attrs = {k: v for k, v in ds.attrs.items() if k != "computed"}
        return ds

    return without_time(saved).identical(without_time(stats))


def state_list(text: str) -> list[int]:
    """``--layers`` as store states: comma-separated non-negative integers."""
    try:
        states = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated store states like 4,8,12, got {text!r}") from None
    if any(s < 0 for s in states):
        raise argparse.ArgumentTypeError(f"store states are >= 0, got {text!r}")
    return states


def main(argv: list[str] | None = None) -> xr.Dataset:
    """Command-line entry (also what ``actstore analyze`` runs)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--saes", required=True, help="SAE suite YAML")
    parser.add_argument("--scheduler", default=None, help="'local' or a scheduler address")
    parser.add_argument("--layers", default=None, type=state_list,
                        help="comma-separated store states (default: all in the suite)")
    parser.add_argument("--weight-dtype", default="float32", choices=sorted(WEIGHT_DTYPES),
                        help="SAE matrix products in bf16 on tensor cores (GPU) instead of exact float32")
    parser.add_argument("--top-k", type=int, default=8, help="top-activating examples kept per latent and kind")
    parser.add_argument("--tokens-per-task", type=int, default=None,
                        help=f"tokens each task runs at once (default: {TOKENS_PER_TASK} where the tasks run on a GPU: "
                             "the cluster's workers with --scheduler, else this process; otherwise one stored chunk)")
    args = parser.parse_args(argv)
    layers = args.layers
    with ExitStack() as stack:
        scheduler = None
        if args.scheduler:
            from distributed import Client, LocalCluster

            cluster = stack.enter_context(LocalCluster(dashboard_address=None)) if args.scheduler == "local" else None
            scheduler = stack.enter_context(Client(cluster if cluster is not None else args.scheduler))
        return run_analysis(args.store, args.saes, layers=layers, scheduler=scheduler, weight_dtype=args.weight_dtype,
                            top_k=args.top_k, tokens_per_task=args.tokens_per_task)


if __name__ == "__main__":
    main()
