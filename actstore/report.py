"""``actstore report STORE``: the layer-wise picture of an analysed store as a folder with ``report.md``,
``report.html`` and PNG figures: FVU, L0, cosine and semantic alignment against the layer for image and text
tokens; latent-frequency histograms; per layer, the top latents on image tokens (the most frequent, and the
strongest of those firing on few image tokens) with their descriptions; and a few images with per-patch heat maps of
one latent.

Every number comes from the statistics that ``actstore analyze`` saved in the store (``analysis/<suite>``); only the
heat maps read activations again (one image at a time) and need the suite's SAEs.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr

from actstore.examples import check_state_and_latent, kept_top_examples, top_examples
from actstore.integrity import saved_analyses

TABLE_COLUMNS = (
    ("state", None, None), ("FVU image", "fvu", "image"), ("FVU text", "fvu", "text"),
    ("L0 image", "l0_mean", "image"), ("L0 text", "l0_mean", "text"), ("cosine image", "mean_cos", "image"),
    ("cosine text", "mean_cos", "text"), ("alignment", "alignment", None), ("random", "alignment_baseline", None),
    ("image-only latents", "image_only", None), ("text-only latents", "text_only", None),
    ("image latents on text", "image_latents_on_text", None),
)


def analysis_names(store: str | Path, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The suites a store has been analysed with (groups under ``analysis/``)."""
    import zarr

    from actstore.location import open_zarr_store

    try:
        group = zarr.open_group(open_zarr_store(store, read_only=True, storage_options=storage_options), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return []
    return [analysis["name"] for analysis in saved_analyses(group)]


def choose_analysis(store: str | Path, suite: str | None, storage_options: dict[str, Any] | None = None) -> str:
    """The name of ``store``'s analysis ``suite``, or of its only one; a clear error where that is not one."""
    names = analysis_names(store, storage_options)
    if not names:
        raise ValueError(f"{store} has no analysis yet: run `actstore analyze {store} --saes SUITE.yaml` first")
    if suite is None:
        if len(names) > 1:
            raise ValueError(f"{store} has analyses {names}; choose one with --suite")
        suite = names[0]
    if suite not in names:
        raise ValueError(f"{store} has no analysis {suite!r}; it has {names}")
    return suite


def layer_value(stats: xr.Dataset, layer: int, name: str, kind: str | None) -> float:
    """One number of the layer table (NaN where the store lacks the variable or token kind); a per-latent flag
    counts the latents that have it."""
    if name not in stats:
        return float("nan")
    row = stats[name].sel(layer=layer)
    if kind is not None:
        if kind not in row.kind.values:
            return float("nan")
        row = row.sel(kind=kind)
    return float(row.sum("latent") if "latent" in row.dims else row)


def image_latents_on_text(stats: xr.Dataset) -> xr.DataArray:
    """Per layer, the share of the latents firing on image tokens that fire on text tokens too: how much of what the
    SAE uses for images is the language's own vocabulary of features (NaN without text tokens)."""
    if "text" not in stats.kind.values:
        return xr.full_like(stats.layer, np.nan, dtype=float)
    on_image = stats.fire_count.sel(kind="image") > 0
    both = on_image & (stats.fire_count.sel(kind="text") > 0)
    return both.sum("latent") / on_image.sum("latent").where(on_image.any("latent"))


def layer_table(stats: xr.Dataset) -> list[list[float]]:
    """Rows of the per-layer table, in TABLE_COLUMNS order."""
    return [[int(layer)] + [layer_value(stats, int(layer), name, kind) for _, name, kind in TABLE_COLUMNS[1:]]
            for layer in stats.layer.values]


def fmt(value: float) -> str:
    """Four significant digits (the report's tests read them back)."""
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.4g}"


# A latent firing on more of the image tokens than this is dense: its heat map and its top images show no structure.
SELECTIVE_FREQUENCY = 0.2
# The report's two rankings of a state's image latents, by key: what each table's heading says.
RANKINGS = {"frequent": "Most frequent on image tokens",
            "selective": f"Strongest selective: firing on at most {SELECTIVE_FREQUENCY:.0%} of image tokens, by their "
                         "largest activation there"}


def latent_rows(stats: xr.Dataset, layer: int, latents: list[int]) -> list[dict[str, Any]]:
    """Image and text firing frequency, largest image activation and description of ``latents`` at ``layer``."""
    freq = stats.fire_freq.sel(layer=layer)
    image = freq.sel(kind="image").values
    text = freq.sel(kind="text").values if "text" in freq.kind.values else np.full_like(image, np.nan)
    act_max = stats.act_max.sel(layer=layer, kind="image").values
    described = stats.description.sel(layer=layer).values if "description" in stats else np.full(len(image), "")
    return [{"latent": j, "image_freq": float(image[j]), "text_freq": float(text[j]), "act_max": float(act_max[j]),
             "description": str(described[j]) or "(no description)"} for j in latents]


def top_image_latents(stats: xr.Dataset, layer: int, n: int) -> list[dict[str, Any]]:
    """The ``n`` latents firing most often on image tokens at ``layer``."""
    image = stats.fire_freq.sel(layer=layer, kind="image").values
    return latent_rows(stats, layer, [int(j) for j in np.argsort(-image, kind="stable")[:n] if image[j] > 0])


def selective_strengths(stats: xr.Dataset, layer: int) -> np.ndarray:
    """Each latent's largest activation on an image token at ``layer`` where it is selective (fires on some image
    tokens, at most SELECTIVE_FREQUENCY of them), else -inf."""
    freq = stats.fire_freq.sel(layer=layer, kind="image").values
    return np.where((freq > 0) & (freq <= SELECTIVE_FREQUENCY), stats.act_max.sel(layer=layer, kind="image").values,
                    -np.inf)


def selective_image_latents(stats: xr.Dataset, layer: int, n: int) -> list[dict[str, Any]]:
    """The ``n`` selective latents at ``layer`` with the largest activations on image tokens. Ranking by frequency
    alone puts dense latents first, which say little about what an image shows."""
    strength = selective_strengths(stats, layer)
    return latent_rows(stats, layer, [int(j) for j in np.argsort(-strength, kind="stable")[:n]
                                      if np.isfinite(strength[j])])


@dataclass
class Figures:
    """Figure files of a report, by role."""

    layers: str = "layers.png"
    frequencies: str = "frequencies.png"
    heatmaps: str | None = None
    heatmap_caption: str = ""


@dataclass
class TextExamples:
    """Where the report's chosen latent fires most on text tokens: the prompt text around each such token."""

    layer: int
    latent: int
    examples: list[dict[str, Any]]
    note: str = ""  # said above the examples
    absent: str = "It never fires on the stored text tokens."  # said instead of examples where there are none


def marked_token(ids: list[int], k: int, decode: Callable[[list[int]], str]) -> str:
    """The text of token ids ``ids`` with token ``k`` in brackets. A token's text is what it adds to the decoded text
    before it, so that word-piece tokenizers' spaces come out as in the prompt."""
    head, upto, whole = decode(ids[:k]), decode(ids[:k + 1]), decode(ids)
    if not (upto.startswith(head) and whole.startswith(upto)):  # a tokenizer that rewrites across tokens
        return f"{head} [[{decode(ids[k:k + 1]).strip()}]] {decode(ids[k + 1:])}".strip()
    token = upto[len(head):]
    lead = token[:len(token) - len(token.lstrip())]
    return f"{head}{lead}[[{token.strip()}]]{whole[len(upto):]}"


def text_examples(ds: xr.Dataset, stats: xr.Dataset, layer: int, latent: int,
                  decode: Callable[[list[int]], str] | None, n: int = 5, before: int = 10,
                  after: int = 4) -> list[dict[str, Any]]:
    """Up to ``n`` text tokens where ``latent`` of state ``layer`` is most active (from the analysis' top-k), each
    with its activation, image, and the prompt text around it (token ids where ``decode`` is None)."""
    if "text" not in stats.kind.values or not kept_top_examples(stats) or ds.sizes.get("text_token", 0) == 0:
        return []
    found = top_examples(stats, ds, layer, latent, "text").head(n)
    if found.empty:
        return []
    text_image, position, token_id = ds.text_image.values, ds.text_position.values, ds.text_token_id.values
    out = []
    for example in found.itertuples():
        prompt = np.flatnonzero(text_image == example.image)
        prompt = prompt[np.argsort(position[prompt], kind="stable")]
        k = int(np.flatnonzero(prompt == example.text_token)[0])
        start = max(0, k - before)
        ids = [int(i) for i in token_id[prompt[start:k + after + 1]]]
        context = marked_token(ids, k - start, decode) if decode is not None else (
            " ".join(f"[[{i}]]" if j == k - start else str(i) for j, i in enumerate(ids)))
        context = ("..." if start else "") + context + ("..." if k + after + 1 < len(prompt) else "")
        out.append({"text_token": int(example.text_token), "image": int(example.image),
                    "activation": float(example.activation),
                    "context": " ".join(context.splitlines())})  # one line: a Markdown list item
    return out


def store_decoder(ds: xr.Dataset) -> tuple[Callable[[list[int]], str] | None, str]:
    """The store's tokenizer's ``decode``, or None and what the report says instead."""
    from actstore.descriptions import try_store_tokenizer

    tokenizer, why_not = try_store_tokenizer(ds.attrs.get("provenance", {}))
    if tokenizer is None:
        return None, f"Token ids shown: {why_not}."
    return (lambda ids: tokenizer.decode(ids)), ""


def plot_layers(stats: xr.Dataset, path: Path) -> None:
    """FVU, L0, cosine, alignment and the image latents shared with text against the layer, image vs text."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = stats.layer.values
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    panels = (("fvu", "FVU (lower: better reconstructed)", True), ("l0_mean", "L0 (active latents per token)", False),
              ("mean_cos", "cosine(x, x_hat)", False))
    for ax, (name, title, log) in zip(axes.flat, panels):
        for kind, style in (("image", "o-"), ("text", "s--")):
            if kind in stats.kind.values:
                ax.plot(layers, stats[name].sel(kind=kind).values, style, label=f"{kind} tokens")
        ax.set_title(title)
        ax.set_xlabel("residual state (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            ax.set_yscale("log")
        ax.legend()
    ax = axes.flat[3]
    if "alignment" in stats:
        ax.plot(layers, stats.alignment.values, "o-", label="image's top latents")
        ax.plot(layers, stats.alignment_baseline.values, "k:", label="random latents")
        ax.legend()
    ax.set_title("semantic alignment (share naming a caption word)")
    ax = axes.flat[4]
    ax.plot(layers, image_latents_on_text(stats).values, "o-")
    ax.set_ylim(0, 1.05)
    ax.set_title("latents firing on images that fire on text too")
    for ax in axes.flat[3:5]:
        ax.set_xlabel("residual state (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[5].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frequencies(stats: xr.Dataset, path: Path) -> None:
    """Histograms of log10 latent firing frequency, image vs text, at the first, middle and last layer."""
    import matplotlib.pyplot as plt

    layers = list(stats.layer.values)
    chosen = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3.2), squeeze=False)
    for ax, layer in zip(axes[0], chosen):
        for kind in stats.kind.values:
            freq = stats.fire_freq.sel(layer=layer, kind=kind).values
            ax.hist(np.log10(freq[freq > 0]), bins=30, alpha=0.6, label=f"{kind} ({int((freq == 0).sum())} dead)")
        ax.set_title(f"state {layer}")
        ax.set_xlabel("log10 firing frequency")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def patch_activations(ds: xr.Dataset, sae: Any, layer: int, image: int, latent: int) -> np.ndarray:
    """One latent's activation at every image token of one image (reads one image of one layer)."""
    import torch

    from actstore.stats import code_tokens
    from kernels import sae_encode_sparse

    x = torch.from_numpy(np.asarray(ds.image_resid.sel(layer=layer).isel(image=image).values, dtype=np.float32))
    codes = sae_encode_sparse(x, sae.W_enc, sae.b_enc, activation=sae.activation, threshold=sae.threshold, k=sae.k,
                              apply_b_dec_to_input=sae.apply_b_dec_to_input, b_dec=sae.b_dec, backend="reference")
    hit = codes.indices == latent
    out = np.zeros(len(x))
    out[code_tokens(codes)[hit].numpy()] = codes.values[hit].double().numpy()
    return out


def plot_heatmaps(ds: xr.Dataset, stats: xr.Dataset, sae: Any, layer: int, latent: int, n_images: int,
                  path: Path, data_path: str | None = None) -> str:
    """Per-patch heat maps of ``latent`` on the images where it is most active, under the pictures themselves where
    the store's data source (or ``data_path``, where it moved) still has them; returns the figure's caption."""
    import matplotlib.pyplot as plt

    from actstore.pictures import store_pictures

    n_tokens = ds.sizes["image_token"]
    kept_top = kept_top_examples(stats)
    images = list(dict.fromkeys(top_examples(stats, ds, layer, latent).image.tolist()))[:n_images] if kept_top else []
    images = images or list(range(min(n_images, ds.sizes["image"])))
    ids = [str(ds.image_id.values[i]) for i in images]
    pictures, not_found = store_pictures(ds.attrs.get("provenance", {}), ids, data_path)
    side = int(round(math.sqrt(n_tokens)))
    shape = (side, side) if side * side == n_tokens else (1, n_tokens)
    rows = 2 if pictures else 1
    fig, axes = plt.subplots(rows, len(images), figsize=(3 * len(images), 3.3 * rows), squeeze=False)
    for column, (image, image_id) in enumerate(zip(images, ids)):
        acts = patch_activations(ds, sae, layer, image, latent).reshape(shape)
        picture = pictures.get(image_id)
        caption = str(ds.prompt.values[image]) if "prompt" in ds.coords else ""
        axes[0][column].set_title("\n".join([f"image {image} ({image_id})", caption[:40]]), fontsize=8)
        if picture is not None:
            axes[0][column].imshow(picture)
        heat = axes[-1][column]
        # Over the picture only where its grid is the image's patch grid: a square picture, squashed or not by the
        # processor alike; other pictures stand above their map, since a processor may crop them.
        overlay = picture is not None and picture.shape[0] == picture.shape[1] and shape[0] == shape[1]
        if overlay:
            heat.imshow(picture.mean(axis=2), cmap="gray", extent=(0, side, side, 0))
        shown = heat.imshow(np.ma.masked_equal(acts, 0) if overlay else acts, cmap="magma", vmin=0,
                            alpha=0.75 if overlay else None, extent=(0, shape[1], shape[0], 0))
        fig.colorbar(shown, ax=heat, fraction=0.046)
        for ax in axes[:, column]:
            ax.set_xticks([])
            ax.set_yticks([])
    description = str(stats.description.sel(layer=layer, latent=latent).values) if "description" in stats else ""
    fig.suptitle(f"latent {latent} at state {layer}: {description or '(no description)'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    where = "the pictures (above) and, below, " if pictures else ""
    silent = "fire_count" in stats and int(stats.fire_count.sel(layer=layer, kind="image", latent=latent)) == 0
    chosen = "images where it is most active" if kept_top else (
        "first images (the analysis kept no top-activating tokens to find where it is most active: --top-k 0)")
    chosen += f" (images {', '.join(map(str, images))})"
    return (f"Per-patch activation of latent {latent} at state {layer} ({description or 'no description'}) on the "
            f"{chosen}: {where}the latent's activation at each image token (patch grid)."
            + (" It never fires on image tokens here: the maps are empty, over the first images." if silent else "")
            + (f" Pictures: {not_found}." if not_found else ""))


def heatmap_choice(stats: xr.Dataset, layer: int | None = None) -> tuple[int, int]:
    """The layer of best alignment over its baseline (else the middle one) unless ``layer`` is given, and there the
    first of the report's strongest selective latents (else the most frequent one: every latent there is dense)."""
    layers = [int(x) for x in stats.layer.values]
    if layer is None:
        layer = layers[len(layers) // 2]
        if "alignment" in stats and np.isfinite(stats.alignment.values).any():
            gain = np.nan_to_num(stats.alignment.values - stats.alignment_baseline.values, nan=-np.inf)
            layer = layers[int(np.argmax(gain))]
    strength = selective_strengths(stats, layer)
    if not np.isfinite(strength).any():
        strength = stats.fire_freq.sel(layer=layer, kind="image").values
    return int(layer), int(np.argmax(strength))


def check_heatmap_request(stats: xr.Dataset, layer: int | None, latent: int | None) -> None:
    """A clear error for heat maps asked of a state the analysis lacks or a latent beyond its SAE's width."""
    if latent is not None and layer is None:
        raise ValueError("--latent needs --state: latent indices are per SAE, and each state has its own")
    if layer is not None:
        check_state_and_latent(stats, layer, latent)


def text_heading(text: TextExamples) -> str:
    """The heading of the text examples' section."""
    return (f"Where latent {text.latent} at state {text.layer} fires most on text (activation, image, the prompt "
            "around the token in [[ ]])")


def render_markdown(title: str, facts: list[str], table: list[list[float]], tops: dict[int, dict[str, list[dict]]],
                    figures: Figures, text: TextExamples | None = None) -> str:
    """The report as Markdown."""
    lines = [f"# {title}", "", *[f"- {f}" for f in facts], "", "## Per layer", "",
             "| " + " | ".join(c for c, _, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join([str(row[0])] + [fmt(v) for v in row[1:]]) + " |" for row in table]
    lines += ["", f"![FVU, L0, cosine and alignment per layer]({figures.layers})", "",
              "## Latent firing frequencies", "", f"![firing frequency histograms]({figures.frequencies})", ""]
    if figures.heatmaps:
        lines += ["## Heat maps", "", figures.heatmap_caption, "", f"![per-patch heat maps]({figures.heatmaps})", ""]
    if text is not None:
        lines += [f"## {text_heading(text)}", "", *([text.note, ""] if text.note else [])]
        lines += [f"- {fmt(e['activation'])} (image {e['image']}): {e['context']}" for e in text.examples]
        lines += [""] if text.examples else [text.absent, ""]
    lines += ["## Top latents on image tokens", ""]
    for layer, rankings in tops.items():
        lines += [f"### State {layer}", ""]
        for ranking, rows in rankings.items():
            lines += [f"{RANKINGS[ranking]}:", ""]
            if not rows:
                lines += ["(none)", ""]
                continue
            lines += ["| latent | image freq | text freq | max activation | description |", "|---|---|---|---|---|"]
            lines += [f"| {r['latent']} | {fmt(r['image_freq'])} | {fmt(r['text_freq'])} | {fmt(r['act_max'])} | "
                      f"{r['description']} |" for r in rows]
            lines.append("")
    return "\n".join(lines)


def render_html(title: str, facts: list[str], table: list[list[float]], tops: dict[int, dict[str, list[dict]]],
                figures: Figures, text: TextExamples | None = None) -> str:
    """The report as a self-contained HTML page (figures are files beside it)."""
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c, _, _ in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(v) if i else str(v))}</td>" for i, v in enumerate(row)) + "</tr>"
                   for row in table)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
             f"<h1>{esc(title)}</h1><ul>" + "".join(f"<li>{esc(f)}</li>" for f in facts) + "</ul>",
             f"<h2>Per layer</h2><table id='layers'><tr>{head}</tr>{body}</table>",
             f"<p><img src='{figures.layers}' alt='per-layer curves'></p>",
             f"<h2>Latent firing frequencies</h2><p><img src='{figures.frequencies}' alt='frequencies'></p>"]
    if figures.heatmaps:
        parts.append(f"<h2>Heat maps</h2><p>{esc(figures.heatmap_caption)}</p>"
                     f"<p><img src='{figures.heatmaps}' alt='heat maps'></p>")
    if text is not None:
        parts.append(f"<h2>{esc(text_heading(text))}</h2>" + (f"<p>{esc(text.note)}</p>" if text.note else "")
                     + ("<ul id='text-examples'>" + "".join(
                         f"<li>{fmt(e['activation'])} (image {e['image']}): "
                         + esc(e["context"]).replace("[[", "<b>").replace("]]", "</b>") + "</li>"
                         for e in text.examples) + "</ul>" if text.examples
                        else f"<p>{esc(text.absent)}</p>"))
    parts.append("<h2>Top latents on image tokens</h2>")
    for layer, rankings in tops.items():
        parts.append(f"<h3>State {layer}</h3>")
        for ranking, rows in rankings.items():
            parts.append(f"<p>{esc(RANKINGS[ranking])}:</p>" + ("<p>(none)</p>" if not rows else (
                f"<table class='{ranking}'><tr><th>latent</th><th>image freq</th><th>text freq</th>"
                "<th>max activation</th><th>description</th></tr>" + "".join(
                    f"<tr><td>{r['latent']}</td><td>{fmt(r['image_freq'])}</td><td>{fmt(r['text_freq'])}</td>"
                    f"<td>{fmt(r['act_max'])}</td><td style='text-align:left'>{esc(r['description'])}</td></tr>"
                    for r in rows) + "</table>")))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(store: str | Path, out: str | Path | None = None, suite: str | None = None,
                 suite_path: str | Path | None = None, n_top: int = 5, n_images: int = 4, layer: int | None = None,
                 latent: int | None = None, data_path: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> Path:
    """Write the report of ``store``'s analysis ``suite`` (the only one if not given) into ``out``; returns it. The
    heat maps show ``latent`` of state ``layer`` on ``n_images`` images (by default a selective latent of the state
    that aligns best), under their pictures from the harvested data (at ``data_path`` if it moved).
    ``storage_options`` are fsspec's for a URL (as ``actstore.open`` takes them)."""
    import matplotlib

    matplotlib.use("Agg")
    import actstore
    from actstore.location import local_path
    from actstore.saes import load_suite
    from actstore.stats import open_stats

    suite = choose_analysis(store, suite, storage_options)
    stats = open_stats(str(store), suite, storage_options=storage_options)
    check_heatmap_request(stats, layer, latent)
    if n_images < 1:
        raise ValueError(f"heat maps need at least one image, got {n_images}")
    ds = actstore.open(store, storage_options=storage_options)
    if out is None:  # beside a local store; in this folder for one behind a URL (s3://...)
        local = local_path(store)
        out = (local.parent if local is not None else Path.cwd()) / f"report-{suite}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = Figures()
    plot_layers(stats, out / figures.layers)
    plot_frequencies(stats, out / figures.frequencies)
    suite_path = suite_path or stats.attrs.get("suite_path")
    missing_heatmaps = "no heat maps: the suite's SAEs were not found (pass --saes)"
    if latent is None:
        layer, latent = heatmap_choice(stats, layer)
    text = None
    if "text" in stats.kind.values and not kept_top_examples(stats):
        text = TextExamples(layer, latent, [], absent="No examples: the analysis kept no top-activating tokens "
                                                      "(rerun it with --top-k above 0).")
    elif "text" in stats.kind.values:
        decode, note = store_decoder(ds)
        text = TextExamples(layer, latent, text_examples(ds, stats, layer, latent, decode), note)
    if suite_path and Path(suite_path).exists():
        sae = load_suite(suite_path).saes[layer]
        analysed = json.loads(stats.attrs.get("fingerprint", "{}")).get("saes", {}).get(str(layer), {}).get("weights")
        if analysed is None or analysed == sae.digest():
            figures.heatmaps = "heatmaps.png"
            figures.heatmap_caption = plot_heatmaps(ds, stats, sae, layer, latent, n_images, out / figures.heatmaps,
                                                     data_path)
        else:  # a latent's map from other weights would not show the latent the statistics describe
            missing_heatmaps = (f"no heat maps: the SAE of state {layer} in {suite_path} is not the one analysed "
                                "(retrained since?); rerun the analysis, or pass --saes with the analysed suite")
    table = layer_table(stats.assign(image_latents_on_text=image_latents_on_text(stats)))
    tops = {int(x): {"frequent": top_image_latents(stats, int(x), n_top),
                     "selective": selective_image_latents(stats, int(x), n_top)} for x in stats.layer.values}
    sources = json.loads(stats.attrs.get("description_sources", "{}"))
    facts = [f"store `{store}`: {ds.sizes['image']} images x {ds.sizes['image_token']} image tokens, "
             f"{ds.sizes.get('text_token', 0)} text tokens, {ds.sizes['layer']} residual states",
             f"SAE suite `{suite}`, analysed {stats.attrs.get('computed', '?')}",
             "FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all tokens of a kind; L0 = active latents per "
             "token; alignment = share of an image's 5 most active latents whose description names a caption word; "
             "image-only latents fire on some image token and on no text token (text-only: the reverse); image "
             "latents on text = the share of latents firing on image tokens that fire on text tokens too",
             "descriptions: " + (", ".join(sorted(set(sources.values()))) or "none")]
    if not figures.heatmaps:
        facts.append(missing_heatmaps)
    title = f"actstore report: {Path(store).name} / {suite}"
    (out / "report.md").write_text(render_markdown(title, facts, table, tops, figures, text))
    (out / "report.html").write_text(render_html(title, facts, table, tops, figures, text))
    return out
