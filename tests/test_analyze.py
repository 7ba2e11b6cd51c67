"""SAE suites loaded with sae-lens (and Gemma Scope npz), and the analyze job saving statistics into the store."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

import actstore
from actstore.saes import load_suite, state_of_hook
from actstore.stats import compute_layer_stats, open_stats
from jobs.analyze import run_analysis
from conftest import hub_snapshot
from test_stats import D, F, N_IMAGES, make_saes, write_store

ROOT = Path(__file__).resolve().parent.parent


def save_as_sae_lens(params, path, hook: str) -> None:
    """Write SAEParams as a sae-lens StandardSAE folder with its hook name."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, dtype="float32", device="cpu", apply_b_dec_to_input=False))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(params, name))
    sae.cfg.metadata.hook_name = hook
    sae.save_model(str(path))


@pytest.fixture
def store_and_suite(tmp_path):
    write_store(tmp_path / "s.zarr", 4)
    saes = make_saes()
    save_as_sae_lens(saes[0], tmp_path / "sae0", "blocks.0.hook_resid_pre")  # state 0
    save_as_sae_lens(saes[5], tmp_path / "sae5", "blocks.4.hook_resid_post")  # state 5
    suite = {"name": "test-suite", "saes": [{"source": "local", "path": "sae0"}, {"source": "local", "path": "sae5"}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    return tmp_path, saes


def write_described_suite(root: Path) -> Path:
    """The fixture's suite with a Neuronpedia export naming latent 3 of state 5 "red circles": described.yaml."""
    (root / "np-5.json").write_text(json.dumps([{"layer": "5-res", "index": 3, "description": "red circles"}]))
    described = yaml.safe_load((root / "suite.yaml").read_text())
    described["saes"][1].update(descriptions="np-5.json", neuronpedia_sae_id="5-res")
    (root / "described.yaml").write_text(yaml.safe_dump(described))
    return root / "described.yaml"


@contextlib.contextmanager
def stopped_while_marking(prefix: str) -> Iterator[None]:
    """The analysis run inside is stopped (KeyboardInterrupt, as a kill would stop it) as it marks a group whose path
    starts with ``prefix`` saved: that group's arrays are written, its mark is not."""
    import actstore.stats as stats_module

    real_mark = stats_module._mark_saved

    def mark(store, group, value):
        if group.startswith(prefix):
            raise KeyboardInterrupt("stopped")
        real_mark(store, group, value)

    stats_module._mark_saved = mark
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        stats_module._mark_saved = real_mark


def test_hooks_map_to_store_states():
    assert state_of_hook("blocks.0.hook_resid_pre") == 0
    assert state_of_hook("blocks.11.hook_resid_post") == 12
    with pytest.raises(ValueError, match="not a residual-stream hook"):
        state_of_hook("blocks.3.attn.hook_z")


def test_analyze_saves_reloadable_idempotent_statistics(store_and_suite):
    root, saes = store_and_suite
    stats = run_analysis(str(root / "s.zarr"), str(root / "suite.yaml"), backend="reference")
    direct = compute_layer_stats(actstore.open(root / "s.zarr"), saes, backend="reference", top_k=8)
    for name in direct.data_vars:
        np.testing.assert_allclose(stats[name].values, direct[name].values, rtol=1e-12, err_msg=name)
    saved = open_stats(str(root / "s.zarr"), "test-suite")
    assert saved.attrs["suite"] == "test-suite"
    np.testing.assert_array_equal(saved.fvu.values, stats.fvu.values)
    again = run_analysis(str(root / "s.zarr"), str(root / "suite.yaml"), backend="reference")  # rerun: same result
    np.testing.assert_array_equal(open_stats(str(root / "s.zarr"), "test-suite").fire_count.values,
                                  again.fire_count.values)
    assert actstore.open(root / "s.zarr").sizes["image"] == 22  # the store's own data is untouched


def test_gemma_scope_npz_entry(store_and_suite):
    root, saes = store_and_suite
    p = saes[5]
    np.savez(root / "params.npz", W_enc=p.W_enc.numpy(), b_enc=p.b_enc.numpy(), W_dec=p.W_dec.numpy(),
             b_dec=p.b_dec.numpy(), threshold=np.zeros(F, np.float32))
    (root / "npz.yaml").write_text(yaml.safe_dump(
        {"name": "npz",
         "saes": [{"source": "gemma_scope_npz", "path": "params.npz", "hook": "blocks.4.hook_resid_post"}]}))
    suite = load_suite(root / "npz.yaml")
    assert list(suite.saes) == [5] and suite.saes[5].activation == "jumprelu"
    # JumpReLU with zero thresholds is ReLU: the same statistics as the ReLU SAE
    a = compute_layer_stats(actstore.open(root / "s.zarr"), suite.saes, backend="reference")
    b = compute_layer_stats(actstore.open(root / "s.zarr"), {5: saes[5]}, backend="reference")
    np.testing.assert_allclose(a.fvu.values, b.fvu.values, rtol=1e-6)


def test_suite_errors_name_the_problem(store_and_suite):
    root, _ = store_and_suite
    (root / "bad.yaml").write_text(yaml.safe_dump({"saes": [{"source": "local", "path": "sae5", "state": 3}]}))
    with pytest.raises(ValueError, match=r"says state 3, but its hook 'blocks.4.hook_resid_post' reads state 5"):
        load_suite(root / "bad.yaml")
    (root / "conflict.yaml").write_text(yaml.safe_dump({"saes": [{"source": "local", "path": "sae5", "hook":
                                                                    "blocks.6.hook_resid_post"}]}))
    with pytest.raises(ValueError, match=r"says hook 'blocks.6.hook_resid_post', but the SAE was trained on"):
        load_suite(root / "conflict.yaml")
    save_as_sae_lens(make_saes()[5], root / "sae7", "blocks.6.hook_resid_post")
    (root / "missing.yaml").write_text(yaml.safe_dump({"saes": [{"source": "local", "path": "sae7"}]}))
    with pytest.raises(ValueError, match=r"state 7: the store has no such layer"):
        run_analysis(str(root / "s.zarr"), str(root / "missing.yaml"), backend="reference")
    logged = []
    with pytest.raises(ValueError, match=r"state\(s\) \[3\], which suite 'test-suite' has no SAE for; it has \[0, 5\]"):
        run_analysis(str(root / "s.zarr"), str(root / "suite.yaml"), layers=[0, 3], backend="reference",
                     log=logged.append)
    assert not any("(1/" in line for line in logged)  # refused before any layer ran


def test_the_command_line_names_bad_input_without_a_traceback(store_and_suite, capsys):
    from jobs.cli import main as cli

    root, _ = store_and_suite
    assert cli(["analyze", str(root / "s.zarr"), "--saes", str(root / "nosuch.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nosuch.yaml" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        cli(["analyze", str(root / "s.zarr"), "--saes", str(root / "suite.yaml"), "--layers", "4,x"])
    assert exit_.value.code == 2 and "expected comma-separated store states like 4,8,12, got '4,x'" in \
        capsys.readouterr().err


def test_descriptions_from_a_neuronpedia_export_or_derived_from_text(store_and_suite):
    root, _ = store_and_suite
    export = [{"modelId": "m", "layer": "4-res", "index": "3", "description": "red things"},
              {"modelId": "m", "layer": "9-res", "index": "3", "description": "another SAE's latent"}]
    (root / "np.json").write_text(json.dumps(export))
    suite = yaml.safe_load((root / "suite.yaml").read_text())
    suite["saes"][1].update(descriptions="np.json", neuronpedia_sae_id="4-res")
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    stats = run_analysis(str(root / "s.zarr"), str(root / "suite.yaml"), backend="reference")
    described = stats.description.sel(layer=5).values
    assert described[3] == "red things" and (described[np.arange(F) != 3] == "").all()
    sources = json.loads(stats.attrs["description_sources"])
    assert sources["5"].startswith("neuronpedia:") and sources["0"] == "derived from top-activating text tokens"
    saved = open_stats(str(root / "s.zarr"), "test-suite")
    assert saved.description.sel(layer=5).values[3] == "red things"
    assert saved.image_top_latents.shape == (2, 22, 5)


def test_an_interrupted_analysis_resumes_with_the_missing_layers(store_and_suite, monkeypatch):
    import jobs.analyze
    from actstore.stats import checkpoint_group

    root, _ = store_and_suite
    store, suite = str(root / "s.zarr"), str(root / "suite.yaml")
    whole = run_analysis(store, suite, backend="reference")
    shutil.rmtree(root / "s.zarr" / "analysis")  # else every layer is reused from the finished analysis
    calls, crash = [], [True]

    def crash_on_second_layer(ds, saes, layers, **kwargs):
        calls.append(list(layers))
        if crash[0] and len(calls) == 2:
            raise RuntimeError("worker lost")
        return compute_layer_stats(ds, saes, layers, **kwargs)

    monkeypatch.setattr(jobs.analyze, "compute_layer_stats", crash_on_second_layer)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_analysis(store, suite, backend="reference")
    assert (root / "s.zarr" / checkpoint_group("test-suite", 0)).is_dir()
    calls.clear()
    resumed = run_analysis(store, suite, backend="reference")
    assert calls == [[5]]  # state 0 was kept
    for name in whole.data_vars:
        np.testing.assert_array_equal(resumed[name].values, whole[name].values, err_msg=name)
    assert not (root / "s.zarr" / checkpoint_group("test-suite")).exists()
    assert not (root / "s.zarr" / "analysis_partial").exists()  # no empty group left behind
    # another setting does not reuse kept layers
    shutil.rmtree(root / "s.zarr" / "analysis")
    with pytest.raises(RuntimeError):
        calls.clear()
        run_analysis(store, suite, backend="reference")  # crashes on state 5, keeps state 0
    calls.clear()
    crash[0] = False
    run_analysis(store, suite, backend="reference", top_k=3)
    assert calls == [[0], [5]]


def test_an_analysis_finishing_keeps_the_layers_another_has_just_begun_to_keep(store_and_suite, monkeypatch):
    """Two suites analysed at once on one store (say, 16k and 65k SAEs): the one finishing removes the shared
    checkpoint group once it looks empty, and the other may keep its first layer there right after that look."""
    import actstore.stats as stats_module
    from actstore.stats import load_layer_checkpoint, save_layer_checkpoint

    root, saes = store_and_suite
    store = str(root / "s.zarr")
    other = compute_layer_stats(actstore.open(store), saes, [5], backend="reference")
    real_list_keys = stats_module.list_keys

    def list_then_other_keeps_a_layer(zarr_store, prefix):
        seen = real_list_keys(zarr_store, prefix)
        if prefix.startswith("analysis_partial"):
            save_layer_checkpoint(store, "other-suite", 5, other, "fingerprint")
        return seen

    monkeypatch.setattr(stats_module, "list_keys", list_then_other_keeps_a_layer)
    run_analysis(store, str(root / "suite.yaml"), backend="reference")
    monkeypatch.undo()
    kept = load_layer_checkpoint(store, "other-suite", 5, "fingerprint")
    assert kept is not None
    xr.testing.assert_equal(kept.drop_attrs(), other.drop_attrs())
    stats_module.remove_checkpoints(store, "other-suite")  # the last one out leaves nothing behind
    assert not (root / "s.zarr" / "analysis_partial").exists()


def test_an_analysis_stopped_while_saving_is_never_read_as_a_result(store_and_suite, monkeypatch):
    """xarray writes a group's attributes before its arrays: a run stopped while saving a layer or the result leaves
    a group that must not pass for one (its unwritten chunks would read as fill values). Such a group is refused by
    name, and the rerun computes what it held."""
    import jobs.analyze
    from actstore.errors import IncompleteAnalysisError
    from actstore.integrity import store_info

    root, _ = store_and_suite
    store, suite = str(root / "s.zarr"), str(root / "suite.yaml")
    whole = run_analysis(store, suite, backend="reference")
    shutil.rmtree(root / "s.zarr" / "analysis")
    calls = []
    monkeypatch.setattr(jobs.analyze, "compute_layer_stats",
                        lambda *args, **kwargs: calls.append(args[2]) or compute_layer_stats(*args, **kwargs))
    with stopped_while_marking("analysis_partial"):
        run_analysis(store, suite, backend="reference")  # stopped while keeping state 0
    calls.clear()
    with stopped_while_marking("analysis/"):
        run_analysis(store, suite, backend="reference")  # stopped while saving the result
    assert calls == [[0], [5]]  # the unmarked state 0 was computed again
    with pytest.raises(IncompleteAnalysisError, match="analysis/test-suite .* is incomplete"):
        open_stats(store, "test-suite")
    assert [a["complete"] for a in store_info(store)["analyses"]] == [False]
    calls.clear()
    resumed = run_analysis(store, suite, backend="reference")
    assert calls == []  # both layers were kept, marked, before the result's save was stopped
    for name in whole.data_vars:
        np.testing.assert_array_equal(resumed[name].values, whole[name].values, err_msg=name)
        np.testing.assert_array_equal(open_stats(store, "test-suite")[name].values, whole[name].values, err_msg=name)
    assert [a["complete"] for a in store_info(store)["analyses"]] == [True]


def test_a_saved_analysis_is_durable_before_it_is_marked_saved(store_and_suite, monkeypatch):
    """As a harvest's block marker, the mark of a saved analysis must vouch for data that survives a power cut: every
    file and folder of the group is fsync'd before the mark is written, and the mark itself after."""
    import os
    import actstore.stats as stats_module
    from actstore.stats import save_stats

    root, saes = store_and_suite
    store = root / "s.zarr"
    stats = compute_layer_stats(actstore.open(store), saes, backend="reference", top_k=8)
    events = []
    fsync, mark = os.fsync, stats_module._mark_saved
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(Path(os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(stats_module, "_mark_saved", lambda *args: events.append("mark") or mark(*args))
    save_stats(str(store), "durable", stats)
    group = (store / "analysis" / "durable").resolve()
    written = {p for p in group.rglob("*")} | {group, group.parent}
    assert events.count("mark") == 1
    before, after = set(events[:events.index("mark")]), set(events[events.index("mark") + 1:])
    assert written <= before, sorted(map(str, written - before))[:5]
    assert {group / "zarr.json", group} <= after
    saved = open_stats(str(store), "durable")
    for name in stats.data_vars:
        np.testing.assert_array_equal(saved[name].values, stats[name].values, err_msg=name)


def test_a_finished_analysis_is_reused_when_only_descriptions_are_added(store_and_suite, monkeypatch):
    import jobs.analyze

    root, saes = store_and_suite
    store, suite = str(root / "s.zarr"), str(root / "suite.yaml")
    first = run_analysis(store, suite, backend="reference")
    write_described_suite(root)
    calls = []
    monkeypatch.setattr(jobs.analyze, "compute_layer_stats",
                        lambda *args, **kwargs: calls.append(args[2]) or compute_layer_stats(*args, **kwargs))
    logged = []
    again = run_analysis(store, str(root / "described.yaml"), backend="reference", log=logged.append)
    assert calls == [] and sum("kept from the saved analysis" in line for line in logged) == 2
    assert again.description.sel(layer=5, latent=3).item() == "red circles"
    for name in first.data_vars:
        if name not in ("description", "alignment", "alignment_baseline"):
            np.testing.assert_array_equal(again[name].values, first[name].values, err_msg=name)
    # a run on some layers keeps the saved analysis of the others
    only = run_analysis(store, str(root / "described.yaml"), layers=[5], backend="reference")
    assert calls == [] and list(only.layer.values) == [0, 5]
    assert list(open_stats(store, "test-suite").layer.values) == [0, 5]
    # other settings, or an SAE retrained into the same folder, are computed afresh, without reading the stale result
    loaded = []
    load = xr.Dataset.load
    monkeypatch.setattr(xr.Dataset, "load",
                        lambda self, **kw: loaded.append(self.attrs.get("suite")) or load(self, **kw))
    run_analysis(store, str(root / "described.yaml"), backend="reference", top_k=3)
    assert calls == [[0], [5]] and "test-suite" not in loaded
    calls.clear()
    retrained = dataclasses.replace(saes[5], b_enc=saes[5].b_enc + 0.01)
    save_as_sae_lens(retrained, root / "sae5", "blocks.4.hook_resid_post")
    run_analysis(store, str(root / "described.yaml"), backend="reference", top_k=3)
    assert calls == [[0], [5]]


def test_a_rerun_rewrites_only_a_changed_result_and_a_stopped_rewrite_loses_no_layer(store_and_suite, monkeypatch):
    """A rerun that would save what is saved writes nothing; one that changes the result (descriptions added) rewrites
    analysis/<suite> in place, so it keeps the layers it reuses first: stopped while saving, even a rerun on fewer
    layers finds every computed layer again."""
    import jobs.analyze

    root, _ = store_and_suite
    store, suite = str(root / "s.zarr"), str(root / "suite.yaml")
    first = run_analysis(store, suite, backend="reference")
    calls, saves = [], []
    monkeypatch.setattr(jobs.analyze, "compute_layer_stats",
                        lambda *args, **kwargs: calls.append(args[2]) or compute_layer_stats(*args, **kwargs))
    save = jobs.analyze.save_stats
    monkeypatch.setattr(jobs.analyze, "save_stats",
                        lambda *args, **kwargs: saves.append(args[1]) or save(*args, **kwargs))
    again = run_analysis(store, suite, backend="reference")
    assert calls == [] and saves == []
    assert again.attrs["computed"] == first.attrs["computed"] == open_stats(store, "test-suite").attrs["computed"]

    write_described_suite(root)
    with stopped_while_marking("analysis/"):
        run_analysis(store, str(root / "described.yaml"), backend="reference")
    assert saves == ["test-suite"]
    resumed = run_analysis(store, str(root / "described.yaml"), layers=[5], backend="reference")
    assert calls == [] and list(resumed.layer.values) == [0, 5]
    assert resumed.description.sel(layer=5, latent=3).item() == "red circles"
    saved = open_stats(store, "test-suite")
    for name in first.data_vars:
        if name not in ("description", "alignment", "alignment_baseline"):
            np.testing.assert_array_equal(saved[name].values, first[name].values, err_msg=name)
    assert not (root / "s.zarr" / "analysis_partial").exists()


def sae_lens_sae(kind: str, **config):
    """A sae-lens inference SAE of ``kind`` with random weights (d_in D, d_sae F), biases and thresholds nonzero."""
    import sae_lens

    classes = {"standard": "StandardSAE", "jumprelu": "JumpReLUSAE", "topk": "TopKSAE", "gated": "GatedSAE",
               "abstopk": "AbsTopKSAE", "transcoder": "Transcoder"}
    name = classes[kind]
    config = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", **config}
    if kind == "transcoder":
        config.update(d_out=D, apply_b_dec_to_input=False)
    sae = getattr(sae_lens, name)(getattr(sae_lens, name + "Config")(**config))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand(F, generator=g) * 0.5)
    return sae


@pytest.mark.parametrize("kind, config", [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": True}), ("jumprelu", {}),
    ("topk", {"k": 5}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
])
def test_sae_lens_saes_give_sae_lens_reconstructions(kind, config):
    from actstore.stats import SAEParams
    from kernels import sae_stats

    sae = sae_lens_sae(kind, **config)
    with torch.no_grad():  # the decoder norms differ per latent, so a fold that ignored them would be seen
        sae.W_dec.mul_(torch.linspace(0.2, 3.0, F)[:, None])
    params = SAEParams.from_sae_lens(sae)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        acts = sae.encode(x)
        want_err = (x - sae.decode(acts)).square().sum(-1)
    got = sae_stats(x, params.W_enc, params.b_enc, params.W_dec, params.b_dec, activation=params.activation,
                    threshold=params.threshold, k=params.k, apply_b_dec_to_input=params.apply_b_dec_to_input,
                    return_codes=True, backend="reference")
    torch.testing.assert_close(got.sq_err.float(), want_err, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.l0.numpy(), (acts > 0).sum(-1).numpy())
    torch.testing.assert_close(got.codes.values.float(), acts[acts > 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, config, message", [
    ("gated", {}, r"GatedSAE \(architecture 'gated'\) is not an SAE the fused kernel computes"),
    ("abstopk", {"k": 4}, r"architecture 'abstopk'"),
    ("transcoder", {}, r"architecture 'transcoder'"),
    ("standard", {"normalize_activations": "layer_norm"}, r"normalises its input \('layer_norm'\)"),
    ("standard", {"normalize_activations": "constant_norm_rescale"}, r"'constant_norm_rescale'"),
    ("topk", {"k": 4, "normalize_activations": "expected_average_only_in"}, r"fold_activation_norm_scaling_factor"),
])
def test_sae_lens_saes_the_kernel_would_get_wrong_are_refused(kind, config, message):
    from actstore.stats import SAEParams

    with pytest.raises(ValueError, match=message):
        SAEParams.from_sae_lens(sae_lens_sae(kind, **config))


def test_an_alignment_against_one_prompt_for_every_image_is_flagged(store_and_suite):
    root, _ = store_and_suite
    logged = []
    run_analysis(str(root / "s.zarr"), str(root / "suite.yaml"), backend="reference", log=logged.append)
    assert any("every image has the prompt ''" in line for line in logged)
    write_store(root / "captioned.zarr", 4, prompts=[f"a red shape number {i}" for i in range(N_IMAGES)])
    logged.clear()
    run_analysis(str(root / "captioned.zarr"), str(root / "suite.yaml"), backend="reference", log=logged.append)
    assert logged and not any("warning" in line for line in logged)


def test_the_shipped_gemma_scope_suite_names_a_real_sae_for_every_block_output(monkeypatch):
    import re

    import sae_lens
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from actstore.saes import SAESuite
    from jobs.harvest import HarvestConfig

    path = ROOT / "jobs" / "configs" / "gemma-scope-2b-res-16k.yaml"
    directory = get_pretrained_saes_directory()  # sae-lens' own list of releases, shipped with it: no download
    for entry in yaml.safe_load(path.read_text())["saes"]:
        release = directory[entry["release"]]
        assert entry["sae_id"] in release.saes_map, entry
        assert release.neuronpedia_id[entry["sae_id"]] == f"{release.model}/{entry['neuronpedia_sae_id']}", entry
        layer = int(re.match(r"layer_(\d+)/", entry["sae_id"]).group(1))
        assert entry["hook"] == f"blocks.{layer}.hook_resid_post", entry

    def from_pretrained(release, sae_id, device="cpu"):  # what sae-lens would download, in miniature
        sae = sae_lens_sae("jumprelu")
        block = re.match(r"layer_(\d+)/", sae_id).group(1)
        sae.cfg.metadata.hook_name = f"blocks.{block}.hook_resid_post"
        return sae

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", staticmethod(from_pretrained))
    suite: SAESuite = load_suite(path)
    harvested = HarvestConfig.from_yaml(ROOT / "jobs" / "configs" / "gemma2-2b-siglip.yaml").harvest
    assert harvested.layers is None  # all 27 states: every SAE of the suite finds its state
    assert sorted(suite.saes) == list(range(1, 27)) and suite.name == "gemma-scope-2b-res-16k"


def test_info_lists_the_saved_analyses_apart_from_the_activations(store_and_suite, capsys):
    from actstore.integrity import store_info
    from jobs.cli import main as cli

    root, _ = store_and_suite
    store = str(root / "s.zarr")
    before = store_info(store)
    assert before["analyses"] == []
    run_analysis(store, str(root / "suite.yaml"), backend="reference")
    after = store_info(store)
    assert [(a["name"], a["layers"]) for a in after["analyses"]] == [("test-suite", [0, 5])]
    assert after["analyses"][0]["computed"] == open_stats(store, "test-suite").attrs["computed"]
    assert after["bytes_stored"] == before["bytes_stored"]  # the analysis is not counted as stored activations
    assert cli(["info", store]) == 0
    assert "analysis     test-suite: states 0..5 (2), computed" in capsys.readouterr().out


def test_a_gemma_scope_sae_loads_offline_from_a_prefilled_hub_cache(tmp_path, monkeypatch):
    """sae-lens' own Gemma Scope loader, no stub: the canonical id resolves to its folder's params.npz in the cache."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release = get_pretrained_saes_directory()["gemma-scope-2b-pt-res-canonical"]
    folder = release.saes_map["layer_12/width_16k/canonical"]  # e.g. layer_12/width_16k/average_l0_82
    snapshot = hub_snapshot(tmp_path, release.repo_id, "c" * 40)
    (snapshot / folder).mkdir(parents=True)
    # Gemma Scope's real shapes (sae-lens takes them from the release, not the file), with 4 dimensions per latent
    # so that the archive stays ~1 MB.
    rng = np.random.default_rng(0)
    d_model, width = 2304, 16384
    w_enc, w_dec = np.zeros((d_model, width), np.float32), np.zeros((width, d_model), np.float32)
    rows = np.stack([rng.choice(d_model, 4, replace=False) for _ in range(width)])
    cols = np.repeat(np.arange(width), 4)
    w_enc[rows.ravel(), cols] = rng.normal(size=4 * width)
    w_dec[cols, rows.ravel()] = rng.normal(size=4 * width)
    params = {"w_enc": w_enc, "w_dec": w_dec, "b_enc": rng.normal(size=width).astype(np.float32),
              "b_dec": rng.normal(size=d_model).astype(np.float32), "threshold": rng.random(width).astype(np.float32)}
    np.savez_compressed(snapshot / folder / "params.npz", **params)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"name": "gemma-scope", "saes": [
        {"source": "sae_lens_pretrained", "release": "gemma-scope-2b-pt-res-canonical",
         "sae_id": "layer_12/width_16k/canonical"}]}))
    suite = load_suite(tmp_path / "suite.yaml")
    assert list(suite.saes) == [13]  # blocks.12.hook_resid_post: the output of the 13th block
    sae = suite.saes[13]
    assert sae.activation == "jumprelu" and not sae.apply_b_dec_to_input
    for ours, theirs in (("W_enc", "w_enc"), ("W_dec", "w_dec"), ("b_enc", "b_enc"), ("b_dec", "b_dec"),
                         ("threshold", "threshold")):
        np.testing.assert_array_equal(getattr(sae, ours).numpy(), params[theirs], err_msg=ours)
    suite.check_store(d_model, list(range(27)))
    with pytest.raises(ValueError, match="2304"):
        suite.check_store(2048, list(range(27)))


def test_a_store_behind_a_url_is_analysed_as_its_local_copy(store_and_suite, tmp_path):
    """The README's `actstore analyze s3://...`: fsspec's memory file system stands in for the object store. The result
    is saved there, reloads equal to the local copy's, and a rerun reuses it."""
    import fsspec

    root, _ = store_and_suite
    url = f"memory://analyze-{tmp_path.name}/s.zarr"
    fsspec.filesystem("memory").put(str(root / "s.zarr"), url, recursive=True)
    suite = str(root / "suite.yaml")
    run_analysis(url, suite, backend="reference")
    local = run_analysis(str(root / "s.zarr"), suite, backend="reference")
    remote = open_stats(url, "test-suite")
    for name in local.data_vars:
        xr.testing.assert_equal(remote[name], local[name])
    logged = []
    run_analysis(url, suite, backend="reference", log=logged.append)
    assert any("up to date: nothing to write" in line for line in logged)
    assert not fsspec.filesystem("memory").exists(url + "/analysis_partial")


def keyed_memory_file_system() -> type:
    """fsspec's memory file system that opens only with ``key="secret"`` in its storage_options (registered as
    ``keyedmemory://``): an object store whose credentials the caller passes instead of configuring them."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class KeyedMemoryFileSystem(MemoryFileSystem):
        protocol = "keyedmemory"

        def __init__(self, *args, key: str | None = None, **kwargs):
            if key != "secret":
                raise PermissionError("keyedmemory: wrong or missing key")
            super().__init__(*args, **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(path.removeprefix("keyedmemory://"))

    fsspec.register_implementation("keyedmemory", KeyedMemoryFileSystem, clobber=True)
    return KeyedMemoryFileSystem


def test_storage_options_reach_every_read_and_write_of_an_analysis(store_and_suite, tmp_path):
    """As actstore.open, the analysis takes a URL's fsspec storage_options: its layers kept while it runs, the result,
    a resumed run, open_stats, the report and the store's checks all reach a store that opens only with them."""
    import fsspec

    keyed_memory_file_system()
    root, _ = store_and_suite
    url, options = f"keyedmemory://keyed-{tmp_path.name}/s.zarr", {"key": "secret"}
    fsspec.filesystem("memory").put(str(root / "s.zarr"), f"memory://keyed-{tmp_path.name}/s.zarr", recursive=True)
    suite = str(root / "suite.yaml")
    with stopped_while_marking("analysis/"):
        run_analysis(url, suite, backend="reference", storage_options=options)
    logged = []
    resumed = run_analysis(url, suite, layers=[5], backend="reference", storage_options=options, log=logged.append)
    assert sum("kept from an interrupted run" in line for line in logged) == 1 and list(resumed.layer.values) == [0, 5]
    local = run_analysis(str(root / "s.zarr"), suite, backend="reference")
    remote = open_stats(url, "test-suite", storage_options=options)
    for name in local.data_vars:
        xr.testing.assert_equal(remote[name], local[name])
    assert not fsspec.filesystem("memory").exists(f"memory://keyed-{tmp_path.name}/s.zarr/analysis_partial")
    with pytest.raises(PermissionError, match="wrong or missing key"):
        open_stats(url, "test-suite")
    from actstore.report import write_report
    from test_report import check_numbers, markdown_layer_table

    report = write_report(url, tmp_path / "report", storage_options=options)
    check_numbers(markdown_layer_table((report / "report.md").read_text()), local)
    # and what `actstore info` and `actstore verify --repair` run
    from actstore.integrity import store_info, verify, withdraw_markers

    info = store_info(url, storage_options=options)
    assert [a["name"] for a in info["analyses"]] == ["test-suite"] and info["blocks_complete"] == 6
    assert verify(url, storage_options=options).ok
    assert withdraw_markers(url, [1], storage_options=options) == [1]
    assert store_info(url, storage_options=options)["blocks_complete"] == 5
