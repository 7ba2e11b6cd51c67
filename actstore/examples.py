"""Where a latent fires most: the analysis' top-k tokens of one latent as a table of images, patches and prompts.

The analysis keeps, per layer, token kind and latent, the ``top_k`` largest activations and their global token
indices (``top_token``: image * image_tokens + patch for image tokens, the index along ``text_token`` for text tokens).
:func:`top_examples` turns those indices back into what a researcher looks up: which image (index and id), which patch
or which prompt token, and the prompt, reading only the coordinates it needs from the store.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import xarray as xr


def check_state_and_latent(stats: xr.Dataset, layer: int, latent: int | None) -> None:
    """A clear error for a state the analysis lacks or a latent beyond its SAE's width."""
    layers = [int(x) for x in stats.layer.values]
    if layer not in layers:
        raise ValueError(f"the analysis has no state {layer}; its states are {layers}")
    if latent is not None and not 0 <= latent < stats.sizes["latent"]:
        raise ValueError(f"latent {latent} is outside the SAE of state {layer}, whose latents are "
                         f"0..{stats.sizes['latent'] - 1}")


def kept_top_examples(stats: xr.Dataset) -> bool:
    """Whether the analysis kept each latent's top-activating tokens (it did not run with ``--top-k 0``)."""
    return "top_token" in stats and stats.sizes.get("rank", 0) > 0


def check_example_request(stats: xr.Dataset, layer: int, latent: int, kind: str) -> None:
    """A clear error for examples of a state, latent or token kind the analysis lacks, or of an analysis that kept
    none (``--top-k 0``)."""
    check_state_and_latent(stats, layer, latent)
    kinds = [str(k) for k in stats.kind.values]
    if kind not in kinds:
        raise ValueError(f"the analysis has no {kind!r} tokens; its token kinds are {kinds}")
    if not kept_top_examples(stats):
        raise ValueError("the analysis kept no top-activating tokens (it ran with --top-k 0): rerun it with "
                         "--top-k above 0")


def top_examples(stats: xr.Dataset, ds: xr.Dataset, layer: int, latent: int, kind: str = "image",
                 decode: Callable[[list[int]], str] | None = None) -> pd.DataFrame:
    """The tokens of ``kind`` where ``latent`` of state ``layer`` is most active, strongest first: activation, image
    index and id, and the patch (image tokens) or the text token, its position in the prompt and its id (decoded where
    ``decode`` is given), and the prompt. ``ds`` is the store the analysis ran on (``actstore.open``)."""
    check_example_request(stats, layer, latent, kind)
    acts = stats.top_act.sel(layer=layer, kind=kind, latent=latent).values
    tokens = stats.top_token.sel(layer=layer, kind=kind, latent=latent).values
    fired = tokens >= 0  # where fewer than k tokens fired, the rest is padding (-1)
    acts, tokens = acts[fired].astype(np.float64), tokens[fired].astype(np.int64)
    if kind == "image":
        per_image = ds.sizes["image_token"]
        images = tokens // per_image
        table = {"activation": acts, "image": images, "patch": tokens % per_image}
    else:
        text = ds[["text_image", "text_position", "text_token_id"]].isel(text_token=tokens)
        images = text.text_image.values.astype(np.int64)
        table = {"activation": acts, "image": images, "text_token": tokens,
                 "position": text.text_position.values.astype(np.int64),
                 "token_id": text.text_token_id.values.astype(np.int64)}
        if decode is not None:
            table["token"] = [decode([int(t)]) for t in table["token_id"]]
    table["image_id"] = ds.image_id.isel(image=images).values.astype(str)
    table["prompt"] = ds.prompt.isel(image=images).values.astype(str) if "prompt" in ds.coords else ""
    return pd.DataFrame(table)
