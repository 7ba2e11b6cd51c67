"""The main job runs the miniature study and leaves a valid store of real residuals."""

import re
from pathlib import Path

import numpy as np

import actstore
from actstore.integrity import store_info, verify
from jobs.demo import run_demo


def test_demo_runs_end_to_end(miniature, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as users run it on a CPU: the kernels' reference path
    path = run_demo(out=str(tmp_path / "demo"))
    out = capsys.readouterr().out
    assert "integrity: OK" in out and "6/6 report" in out
    info = store_info(path)
    assert info["images"] == 512 and info["blocks_complete"] == info["blocks_total"]
    assert info["provenance"]["adapter_sha256"]
    assert verify(path).ok
    ds = actstore.open(path)
    assert ds.image_resid.shape == (5, 512, 16, 64) and ds.text_resid.shape[1] > 512 * 4  # caption tokens
    from actstore.stats import open_stats

    stats = open_stats(str(path), "demo-saes")
    assert list(stats.layer.values) == [0, 1, 2, 3, 4] and list(stats.kind.values) == ["image", "text"]
    # the SAEs were trained on text tokens: they reconstruct text far better than image tokens
    assert (stats.fvu.sel(kind="text") < 0.2).all() and (stats.fvu.sel(kind="image") > stats.fvu.sel(kind="text")).all()
    for layer in stats.layer.values:  # the demo's printed table shows the saved statistics
        assert f"{float(stats.fvu.sel(layer=layer, kind='image')):9.3f}" in out
    assert np.isfinite(ds.image_resid.sel(layer=4).values.astype(np.float32)).all()
    # the report shows per-layer curves and the same numbers as the statistics
    from test_report import check_latent_tables, check_numbers, markdown_latent_tables, markdown_layer_table

    report = tmp_path / "demo" / "report"
    check_numbers(markdown_layer_table((report / "report.md").read_text()), stats)
    check_latent_tables((report / "report.md").read_text(), stats)
    # the default heat maps show the first of their state's strongest selective latents, which fires on images
    heat_state = int(re.search(r"latent \d+ at state (\d+)", (report / "report.md").read_text()).group(1))
    first = markdown_latent_tables((report / "report.md").read_text())[heat_state][1][0]["latent"]
    assert f"latent {first} at state {heat_state}" in (report / "report.md").read_text()
    # and the prompts where that latent fires most, its token marked (in bold on the page)
    from test_report import markdown_text_examples

    shown = markdown_text_examples((report / "report.md").read_text())
    assert shown and all(re.search(r"\[\[\w+\]\]", context) for _, _, context in shown)
    assert re.search(r"<ul id='text-examples'><li>[^<]*<b>\w+</b>", (report / "report.html").read_text())
    assert all((report / name).stat().st_size > 10_000 for name in ("layers.png", "frequencies.png", "heatmaps.png"))
    # the heat maps stand under the world's pictures of their images, every one found again
    heat_maps = (report / "report.md").read_text().split("## Heat maps")[1].split("##")[0]
    assert "the pictures (above)" in heat_maps and "Pictures:" not in heat_maps
    assert np.isfinite(stats.alignment.values).all() and (stats.description != "").sum() > 100
    # the README's queries run as written on the demo's store (the paths and indices of its examples swapped in)
    run_readme_python("## Query a store with xarray", {"runs/demo/activations.zarr": str(path)})
    run_readme_python("## Analyse a harvest", {"/scratch/acts/gemma2-siglip.zarr": str(path),
                                               "gemma-scope-2b-res-16k": "demo-saes", "layer=13": "layer=3",
                                               "latent=1234": "latent=12"})
    # a rerun reuses the trained adapter and rebuilds the same store
    again = run_demo(out=str(tmp_path / "demo"))
    np.testing.assert_array_equal(actstore.open(again).image_resid.values.view(np.uint16),
                                  ds.image_resid.values.view(np.uint16))


def run_readme_python(section: str, replace: dict[str, str]) -> None:
    """Execute the first Python block of a README section, with ``replace`` applied (each must occur)."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    start = text.index(section)
    code = text[text.index("```python\n", start) + len("```python\n"):]
    code = code[: code.index("```")]
    for old, new in replace.items():
        assert old in code, f"the README's {section!r} block no longer contains {old!r}"
        code = code.replace(old, new)
    exec(compile(code, f"README.md {section}", "exec"), {})
