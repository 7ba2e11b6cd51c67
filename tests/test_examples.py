"""A latent's top examples: the tokens where sae-lens finds it most active, traced back to images, patches, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import actstore
from actstore.examples import top_examples
from actstore.miniature import build_tokenizer
from actstore.stats import open_stats
from jobs.analyze import run_analysis
from test_analyze import store_and_suite  # noqa: F401 - fixture


def sae_lens_activations(sae_dir, x: np.ndarray) -> np.ndarray:
    """sae-lens' latent activations of the rows of ``x``: the oracle."""
    from sae_lens import SAE

    with torch.no_grad():
        return SAE.load_from_disk(str(sae_dir)).encode(torch.from_numpy(x.astype(np.float32))).numpy()


def test_top_examples_are_where_sae_lens_finds_the_latent_strongest(store_and_suite):  # noqa: F811
    root, _ = store_and_suite
    store = str(root / "s.zarr")
    run_analysis(store, str(root / "suite.yaml"), backend="reference", top_k=8)
    stats, ds = open_stats(store, "test-suite"), actstore.open(store)
    images = ds.image_resid.sel(layer=5).values
    on_images = sae_lens_activations(root / "sae5", images.reshape(-1, images.shape[-1])).reshape(
        images.shape[0], images.shape[1], -1)
    latent = int(np.argmax((on_images > 0).sum((0, 1))))
    table = top_examples(stats, ds, 5, latent, "image")
    strongest = np.sort(on_images[..., latent].ravel())[::-1][:8]
    assert len(table) == 8 and strongest[-1] > 0
    np.testing.assert_allclose(table.activation, strongest, rtol=1e-5)
    for row in table.itertuples():
        assert on_images[row.image, row.patch, latent] == pytest.approx(row.activation, rel=1e-5)
        assert row.image_id == str(ds.image_id.values[row.image]) == f"img{row.image}"
        assert row.prompt == str(ds.prompt.values[row.image])

    on_text = sae_lens_activations(root / "sae5", ds.text_resid.sel(layer=5).values)
    latent = int(np.argmax((on_text > 0).sum(0)))
    tokenizer = build_tokenizer()
    table = top_examples(stats, ds, 5, latent, "text", decode=tokenizer.decode)
    fired = np.sort(on_text[:, latent])[::-1]
    np.testing.assert_allclose(table.activation, fired[:8][fired[:8] > 0], rtol=1e-5)
    for row in table.itertuples():
        assert on_text[row.text_token, latent] == pytest.approx(row.activation, rel=1e-5)
        assert row.image == int(ds.text_image.values[row.text_token])
        assert row.position == int(ds.text_position.values[row.text_token])
        assert row.token == tokenizer.decode([int(ds.text_token_id.values[row.text_token])]) != ""
    # a latent that fires on fewer than k tokens lists only those
    rare = int(np.flatnonzero(((on_text > 0).sum(0) > 0) & ((on_text > 0).sum(0) < 8))[0])
    assert len(top_examples(stats, ds, 5, rare, "text")) == int((on_text[:, rare] > 0).sum())


def test_top_example_requests_the_analysis_cannot_answer_are_named(store_and_suite):  # noqa: F811
    root, _ = store_and_suite
    store = str(root / "s.zarr")
    run_analysis(store, str(root / "suite.yaml"), backend="reference")
    stats, ds = open_stats(store, "test-suite"), actstore.open(store)
    with pytest.raises(ValueError, match=r"no state 7; its states are \[0, 5\]"):
        top_examples(stats, ds, 7, 0)
    with pytest.raises(ValueError, match=r"latent 100000 is outside the SAE of state 5, whose latents are 0\.\."):
        top_examples(stats, ds, 5, 100_000)
    with pytest.raises(ValueError, match=r"no 'audio' tokens; its token kinds are \['image', 'text'\]"):
        top_examples(stats, ds, 5, 0, "audio")
    run_analysis(store, str(root / "suite.yaml"), backend="reference", top_k=0)
    with pytest.raises(ValueError, match="kept no top-activating tokens"):
        top_examples(open_stats(store, "test-suite"), ds, 5, 0)


def test_the_latent_command_prints_its_description_firing_and_top_examples(store_and_suite, capsys):  # noqa: F811
    from jobs.cli import main as cli

    root, _ = store_and_suite
    store = str(root / "s.zarr")
    run_analysis(store, str(root / "suite.yaml"), backend="reference")
    stats = open_stats(store, "test-suite")
    on_text = sae_lens_activations(root / "sae5", actstore.open(store).text_resid.sel(layer=5).values)
    latent = int(np.argmax((on_text > 0).sum(0)))
    capsys.readouterr()
    assert cli(["latent", store, "--state", "5", "--latent", str(latent), "--kind", "text"]) == 0
    out = capsys.readouterr().out.splitlines()
    described = str(stats.description.sel(layer=5, latent=latent).values) or "(no description)"
    assert out[0] == f"latent {latent} at state 5 (test-suite): {described}"
    assert f"text tokens: fires on {float((on_text[:, latent] > 0).mean()):.4g} of them" in out[2]
    header = out.index("strongest on text tokens:") + 1
    assert out[header].split() == ["activation", "image", "text_token", "position", "token_id", "token", "image_id",
                                   "prompt"]
    shown = [float(line.split()[0]) for line in out[header + 1:]]
    np.testing.assert_allclose(shown, np.sort(on_text[:, latent])[::-1][:len(shown)], rtol=1e-5)
    assert len(shown) == min(8, int((on_text[:, latent] > 0).sum()))
    assert cli(["latent", store, "--state", "7", "--latent", "0"]) == 2
    assert "no state 7; its states are [0, 5]" in capsys.readouterr().err
