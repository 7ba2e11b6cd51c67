"""The report: its tables carry the statistics' numbers, its figures are real PNGs, and bad requests are named."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml
from PIL import Image

from actstore.report import patch_activations, write_report
from actstore.stats import open_stats
from jobs.analyze import run_analysis
from test_analyze import store_and_suite  # noqa: F401 - fixture
from test_stats import write_store

# Which statistic each report column shows, written out independently of actstore.report.
COLUMNS = {"FVU image": ("fvu", "image"), "FVU text": ("fvu", "text"), "L0 image": ("l0_mean", "image"),
           "L0 text": ("l0_mean", "text"), "cosine image": ("mean_cos", "image"), "cosine text": ("mean_cos", "text"),
           "alignment": ("alignment", None), "random": ("alignment_baseline", None),
           "image-only latents": ("image_only", None), "text-only latents": ("text_only", None)}


def markdown_layer_table(text: str) -> list[dict[str, str]]:
    """The rows of the report's per-layer table, as {column: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.startswith("| state |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header) or not cells[0].isdigit():
            break
        rows.append(dict(zip(header, cells)))
    return rows


def check_numbers(rows: list[dict[str, str]], stats) -> None:
    """Every cell equals its statistic to the 4 significant digits shown."""
    assert [int(r["state"]) for r in rows] == [int(x) for x in stats.layer.values]
    for row in rows:
        layer = int(row["state"])
        on_image = stats.fire_count.sel(layer=layer, kind="image").values > 0
        on_text = stats.fire_count.sel(layer=layer, kind="text").values > 0
        assert float(row["image latents on text"]) == pytest.approx((on_image & on_text).sum() / on_image.sum(),
                                                                   rel=5e-4), layer
        for column, (name, kind) in COLUMNS.items():
            value = stats[name].sel(layer=layer)
            value = value.sel(kind=kind) if kind else value
            value = float(np.count_nonzero(value.values) if value.dtype == bool else value)
            if np.isnan(value):
                assert row[column] == "n/a", (layer, column)
            else:
                assert float(row[column]) == pytest.approx(value, rel=5e-4, abs=1e-12), (layer, column)


def markdown_latent_tables(text: str) -> dict[int, list[list[dict[str, str]]]]:
    """Per state, the report's tables of top image latents in order (each a list of {column: cell})."""
    tables: dict[int, list[list[dict[str, str]]]] = {}
    section = text.split("## Top latents on image tokens")[1]
    for part in section.split("### State ")[1:]:
        state, body = part.split("\n", 1)
        tables[int(state)] = []
        for block in body.split(":\n\n")[1:]:
            lines = [line for line in block.splitlines() if line.startswith("|")]
            header = [c.strip() for c in lines[0].strip("|").split("|")] if lines else []
            tables[int(state)].append([dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
                                       for line in lines[2:]])
    return tables


def check_latent_tables(text: str, stats, n: int = 5) -> None:
    """Per state, the report lists the n latents most frequent on image tokens, then the n strongest of those firing
    on at most 20% of image tokens (by their largest image activation), each with its statistics and description."""
    tables = markdown_latent_tables(text)
    assert sorted(tables) == [int(x) for x in stats.layer.values]
    for layer, (frequent, selective) in tables.items():
        image = stats.fire_freq.sel(layer=layer, kind="image").values
        strongest = stats.act_max.sel(layer=layer, kind="image").values
        by_frequency = sorted((j for j in range(len(image)) if image[j] > 0), key=lambda j: -image[j])[:n]
        by_strength = sorted((j for j in range(len(image)) if 0 < image[j] <= 0.2), key=lambda j: -strongest[j])[:n]
        assert [int(r["latent"]) for r in frequent] == by_frequency, layer
        assert [int(r["latent"]) for r in selective] == by_strength, layer
        for row in frequent + selective:
            j = int(row["latent"])
            for column, value in (("image freq", image[j]), ("text freq", stats.fire_freq.sel(layer=layer, kind="text",
                                                                                             latent=j)),
                                  ("max activation", strongest[j])):
                assert float(row[column]) == pytest.approx(float(value), rel=5e-4, abs=1e-12), (layer, j, column)
            described = str(stats.description.sel(layer=layer, latent=j).values)
            assert row["description"] == (described or "(no description)"), (layer, j)


def markdown_text_examples(text: str) -> list[tuple[float, int, str]]:
    """The report's text examples of its chosen latent: (activation, image, prompt text around the token)."""
    section = text.split("## Where latent ")[1].split("\n## ")[0]
    return [(float(a), int(image), context)
            for a, image, context in re.findall(r"^- (\S+) \(image (\d+)\): (.*)$", section, re.M)]


def test_report_tables_carry_the_statistics(store_and_suite, tmp_path):  # noqa: F811
    root, _ = store_and_suite
    store = str(root / "s.zarr")
    with pytest.raises(ValueError, match="has no analysis yet"):
        write_report(store, tmp_path / "none")
    run_analysis(store, str(root / "suite.yaml"), backend="reference")
    out = write_report(store, tmp_path / "report")
    stats = open_stats(store, "test-suite")
    check_numbers(markdown_layer_table((out / "report.md").read_text()), stats)
    check_latent_tables((out / "report.md").read_text(), stats)
    # written without a harvest, the store names no images' source: the heat maps say they go without pictures
    assert "Pictures: the store does not name the data its images came from" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    table = re.search(r"<table id='layers'>(.*?)</table>", page).group(1)
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    assert [c[1] for c in cells] == [f"{float(stats.fvu.sel(layer=x, kind='image')):.4g}" for x in stats.layer.values]
    for name in ("layers.png", "frequencies.png", "heatmaps.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
        assert name in page
    # a second analysis makes the choice explicit
    suite = yaml.safe_load((root / "suite.yaml").read_text())
    (root / "other.yaml").write_text(yaml.safe_dump({**suite, "name": "other"}))
    run_analysis(store, str(root / "other.yaml"), backend="reference")
    with pytest.raises(ValueError, match=r"has analyses \['other', 'test-suite'\]; choose one"):
        write_report(store, tmp_path / "two")
    assert (write_report(store, tmp_path / "two", suite="other") / "report.md").exists()


def test_a_report_goes_beside_a_local_store_and_here_for_a_url(store_and_suite, tmp_path, monkeypatch):  # noqa: F811
    import fsspec

    root, _ = store_and_suite
    run_analysis(str(root / "s.zarr"), str(root / "suite.yaml"), backend="reference")
    assert write_report(str(root / "s.zarr")) == root / "report-test-suite"
    url = f"memory://report-{tmp_path.name}/s.zarr"
    fsspec.filesystem("memory").put(str(root / "s.zarr"), url, recursive=True)
    monkeypatch.chdir(tmp_path)
    out = write_report(url)
    assert out.resolve() == (tmp_path / "report-test-suite").resolve() and (out / "report.md").exists()


def test_heat_maps_are_left_out_when_the_suites_sae_is_not_the_one_analysed(store_and_suite, tmp_path):  # noqa: F811
    import dataclasses

    from test_analyze import save_as_sae_lens

    root, saes = store_and_suite
    store = str(root / "s.zarr")
    run_analysis(store, str(root / "suite.yaml"), backend="reference")
    assert (write_report(store, tmp_path / "same") / "heatmaps.png").exists()
    for state, hook in ((0, "blocks.0.hook_resid_pre"), (5, "blocks.4.hook_resid_post")):  # retrained in place
        save_as_sae_lens(dataclasses.replace(saes[state], b_enc=saes[state].b_enc + 0.01), root / f"sae{state}", hook)
    out = write_report(store, tmp_path / "retrained")
    assert not (out / "heatmaps.png").exists()
    assert "is not the one analysed" in (out / "report.md").read_text()


def test_patch_activations_equal_the_dense_latent(store_and_suite):  # noqa: F811
    import actstore

    root, saes = store_and_suite
    ds = actstore.open(root / "s.zarr")
    sae = saes[5]
    x = ds.image_resid.sel(layer=5).isel(image=7).values.astype(np.float64)
    z = np.maximum(x @ sae.W_enc.double().numpy() + sae.b_enc.double().numpy(), 0)
    latent = int(np.argmax((z > 0).sum(0)))  # one that fires on some of the image's tokens
    assert 0 < (z[:, latent] > 0).sum()
    np.testing.assert_allclose(patch_activations(ds, sae, 5, 7, latent), z[:, latent], rtol=1e-5, atol=1e-6)


def test_heat_maps_of_a_chosen_latent_and_clear_errors_for_bad_choices(store_and_suite, tmp_path, capsys):  # noqa: F811
    from jobs.cli import main as cli

    import actstore
    from actstore.report import plot_heatmaps

    root, saes = store_and_suite
    store = str(root / "s.zarr")
    run_analysis(store, str(root / "suite.yaml"), backend="reference")
    stats = open_stats(store, "test-suite")
    fires = stats.fire_count.sel(layer=5, kind="image").values
    latent = int(np.flatnonzero(fires > 0)[-1])
    assert cli(["report", store, "--out", str(tmp_path / "r"), "--state", "5", "--latent", str(latent),
                "--images", "2"]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert f"latent {latent} at state 5" in text and "never fires on image tokens" not in text
    # the two images shown: those with the latent's strongest image tokens by sae-lens, strongest first
    from test_examples import sae_lens_activations

    resid = actstore.open(store).image_resid.sel(layer=5).values
    strongest = sae_lens_activations(root / "sae5", resid.reshape(-1, resid.shape[-1]))[:, latent].reshape(
        resid.shape[:2]).max(1)
    expected = [int(i) for i in np.argsort(-strongest, kind="stable")[:2]]
    assert f"most active (images {expected[0]}, {expected[1]})" in text
    on_text = int(stats.fire_count.sel(layer=5, kind="text", latent=latent))
    assert ("It never fires on the stored text tokens." in text) == (on_text == 0)
    with Image.open(tmp_path / "r" / "heatmaps.png") as figure:  # two panels, not the default four
        two = figure.size[0]
    assert two < Image.open(write_report(store, tmp_path / "four") / "heatmaps.png").size[0]
    quiet = stats.copy(deep=True)  # as if the latent never fired on an image token
    quiet.fire_count.loc[{"layer": 5, "kind": "image", "latent": latent}] = 0
    caption = plot_heatmaps(actstore.open(store), quiet, saes[5], 5, latent, 2, tmp_path / "quiet.png")
    assert "never fires on image tokens" in caption
    chosen = write_report(store, tmp_path / "state0", layer=0)  # the strongest selective latent of state 0
    assert "at state 0" in (chosen / "report.md").read_text()
    with pytest.raises(ValueError, match=r"no state 7; its states are \[0, 5\]"):
        write_report(store, tmp_path / "x", layer=7)
    with pytest.raises(ValueError, match=r"latent 100000 is outside the SAE of state 5, whose latents are 0\.\."):
        write_report(store, tmp_path / "x", layer=5, latent=100_000)
    with pytest.raises(ValueError, match="--latent needs --state"):
        write_report(store, tmp_path / "x", latent=3)
    with pytest.raises(ValueError, match="at least one image"):
        write_report(store, tmp_path / "x", n_images=0)


def test_the_report_command_passes_where_the_data_moved(monkeypatch, tmp_path):
    import actstore.report
    from jobs.cli import main as cli

    seen = {}
    monkeypatch.setattr(actstore.report, "write_report", lambda *args, **kwargs: seen.update(kwargs) or tmp_path)
    assert cli(["report", "s.zarr", "--data", "/new/place/data.parquet"]) == 0
    assert seen["data_path"] == "/new/place/data.parquet"


def test_the_chosen_latents_strongest_text_tokens_stand_in_their_prompts(store_and_suite, tmp_path):  # noqa: F811
    import torch
    from sae_lens import SAE

    import actstore
    from actstore.miniature import build_tokenizer

    root, _ = store_and_suite
    store = str(root / "s.zarr")
    run_analysis(store, str(root / "suite.yaml"), backend="reference")
    ds = actstore.open(store)
    with torch.no_grad():  # sae-lens' activations of every text token at state 5: the oracle
        acts = SAE.load_from_disk(str(root / "sae5")).encode(
            torch.from_numpy(ds.text_resid.sel(layer=5).values.astype(np.float32))).numpy()
    latent = int(np.argmax((acts > 0).sum(0)))
    assert (acts[:, latent] > 0).sum() > 5
    shown = markdown_text_examples((write_report(store, tmp_path / "r", layer=5, latent=latent) / "report.md")
                                   .read_text())
    np.testing.assert_allclose([a for a, _, _ in shown], np.sort(acts[:, latent])[::-1][:5], rtol=5e-4)
    decode = build_tokenizer().decode
    text_image, token_id = ds.text_image.values, ds.text_token_id.values
    for activation, image, context in shown:
        tokens = np.flatnonzero(text_image == image)  # written in prompt order
        assert context.replace("[[", "").replace("]]", "") == decode(token_id[tokens].tolist())
        marked = re.search(r"\[\[(.*?)\]\]", context).group(1)
        hits = [t for t in tokens if abs(acts[t, latent] - activation) <= 5e-4 * activation]
        assert marked in {decode([int(token_id[t])]) for t in hits}, (context, activation)
    # where the store's tokenizer cannot be had, the report shows token ids and says why
    write_store(root / "unnamed.zarr", 4, provenance={})
    said: list[str] = []
    run_analysis(str(root / "unnamed.zarr"), str(root / "suite.yaml"), backend="reference",
                 log=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("warning: no latent descriptions (the store's tokenizer did not load" in line for line in said)
    text = (write_report(str(root / "unnamed.zarr"), tmp_path / "u", layer=5, latent=latent) / "report.md").read_text()
    assert "Token ids shown: the store's tokenizer did not load (ValueError: the store's provenance names no" in text
    activation, image, context = markdown_text_examples(text)[0]
    assert activation == pytest.approx(float(acts[:, latent].max()), rel=5e-4)
    assert context.replace("[[", "").replace("]]", "").split() == [str(i) for i in token_id[text_image == image]]
    sources = open_stats(str(root / "unnamed.zarr"), "test-suite").attrs["description_sources"]
    assert "none: the store's tokenizer did not load" in sources  # the analysis went on without descriptions
    # an analysis that kept no top-k examples has none to show, and says so rather than that the latent never fires
    run_analysis(store, str(root / "suite.yaml"), backend="reference", top_k=0)
    text = (write_report(store, tmp_path / "k0", layer=5, latent=latent) / "report.md").read_text()
    assert not markdown_text_examples(text) and "the analysis kept no top-activating tokens" in text
    assert "on the first images (the analysis kept no top-activating tokens" in text  # the heat maps' too


@pytest.mark.parametrize("scheme", ["metaspace", "byte-level"])
def test_a_marked_token_keeps_the_prompts_spacing_with_sub_word_tokenizers(scheme):
    """Gemma/Llama-style (▁) and GPT-2-style (Ġ) BPE pieces: the marked text reads as the prompt, the token's own
    piece in brackets (a word split in pieces is marked inside the word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from actstore.report import marked_token

    corpus = ["one small red circle in the center", "two large blue squares on the left"] * 20
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    if scheme == "metaspace":
        tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    prompt = "one small red circle in the center"
    encoded = tokenizer.encode(prompt)
    assert any(not piece.startswith(("▁", "Ġ")) and i for i, piece in enumerate(encoded.tokens))  # sub-word pieces
    for k, piece in enumerate(encoded.tokens):
        marked = marked_token(encoded.ids, k, tokenizer.decode)
        assert marked.replace("[[", "").replace("]]", "") == prompt, marked
        assert re.search(r"\[\[(.*?)\]\]", marked).group(1) == piece.lstrip("▁Ġ"), (marked, piece)
