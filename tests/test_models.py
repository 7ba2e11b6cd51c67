"""AdapterVLM: the template's positions, frozen towers, adapter files, load errors; positions in a tiny LLaVA."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import pytest
import torch

from actstore import world
from actstore.models import AdapterVLM, adapter_sha256, llava_positions
from conftest import hub_snapshot

PROMPTS = ["describe the image .", "one red circle", "what do you see ?", "this is a picture of"]


@pytest.mark.parametrize("prefix", ["", "this is a picture of :"])
def test_positions_follow_the_template(miniature, prefix):
    vlm = AdapterVLM.from_pretrained(miniature["vision"], miniature["lm"], prompt_prefix=prefix)
    tok = vlm.tokenizer
    rows = world.generate(len(PROMPTS), seed=3)
    pixels = vlm.pixel_values([r["image"] for r in rows])
    batch = vlm.build_batch(pixels, PROMPTS)
    n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    T = 16  # 32x32 image, 8x8 patches, CLS dropped
    for i, prompt in enumerate(PROMPTS):
        expected = tok(prompt, add_special_tokens=False)["input_ids"]
        text_positions = batch.text_positions(i)
        assert batch.input_ids[i, text_positions].tolist() == expected
        assert text_positions.tolist() == list(range(1 + n_prefix + T, 1 + n_prefix + T + len(expected)))
        assert batch.image_positions[i].tolist() == list(range(1 + n_prefix, 1 + n_prefix + T))
        assert batch.input_ids[i, 0] == tok.bos_token_id
        assert int(batch.attention_mask[i].sum()) == 1 + n_prefix + T + len(expected)
    assert torch.equal(batch.host_text_mask, batch.text_mask.cpu()) and batch.host_text_mask.device.type == "cpu"
    assert torch.equal(batch.host_input_ids, batch.input_ids.cpu()) and batch.host_input_ids.device.type == "cpu"
    # The embeddings at image positions are the adapter applied to the vision patches (CLS dropped).
    with torch.no_grad():
        patches = vlm.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        torch.testing.assert_close(batch.inputs_embeds[0, batch.image_positions[0]], vlm.adapter(patches)[0])
    for i, prompt in enumerate(PROMPTS):  # labels on exactly the text tokens, nowhere else (no EOS without add_eos)
        labelled = (batch.labels[i] != -100).nonzero().flatten()
        assert labelled.tolist() == batch.text_positions(i).tolist()
        assert batch.labels[i, labelled].tolist() == tok(prompt, add_special_tokens=False)["input_ids"]


def test_labels_cover_text_and_eos_only(tiny_vlm):
    rows = world.generate(2, seed=4)
    batch = tiny_vlm.build_batch(tiny_vlm.pixel_values([r["image"] for r in rows]), [r["caption"] for r in rows],
                                 add_eos=True)
    for i, row in enumerate(rows):
        labelled = (batch.labels[i] != -100).nonzero().flatten()
        ids = tiny_vlm.tokenizer(row["caption"], add_special_tokens=False)["input_ids"]
        assert batch.labels[i, labelled].tolist() == ids + [tiny_vlm.tokenizer.eos_token_id]
        assert labelled[0] == batch.text_positions(i)[0]


def test_towers_are_frozen(tiny_vlm):
    assert all(not p.requires_grad for p in tiny_vlm.vision.parameters())
    assert all(not p.requires_grad for p in tiny_vlm.lm.parameters())
    assert all(p.requires_grad for p in tiny_vlm.adapter.parameters())
    tiny_vlm.train()
    assert not tiny_vlm.vision.training and not tiny_vlm.lm.training and tiny_vlm.adapter.training
    tiny_vlm.eval()


def test_adapter_files_roundtrip_and_refuse_other_dims(tiny_vlm, miniature, tmp_path):
    digest = tiny_vlm.save_adapter(tmp_path / "a")
    assert digest == adapter_sha256(tmp_path / "a") and len(digest) == 64
    other = AdapterVLM.from_pretrained(miniature["vision"], miniature["lm"], adapter=tmp_path / "a")
    assert torch.equal(other.adapter.weight, tiny_vlm.adapter.weight)
    wrong = AdapterVLM(tiny_vlm.vision, tiny_vlm.lm, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                       tiny_vlm.config, adapter=None)
    wrong.config = type(tiny_vlm.config)(**{**tiny_vlm.config.to_json(), "d_model": 128})
    with pytest.raises(ValueError, match="maps d_vision=64 -> d_model=64 .* needs 64 -> 128"):
        wrong.load_adapter(tmp_path / "a")


def test_an_adapter_save_stopped_midway_leaves_no_weights(tiny_vlm, tmp_path, monkeypatch):
    """The weights' file says "trained" (the demo skips training when it exists): a save stopped while writing it
    leaves none under its name, and a complete save after that loads."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def half_then_stop(state, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt("stopped while saving")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        tiny_vlm.save_adapter(tmp_path / "a")
    assert not (tmp_path / "a" / "adapter.safetensors").exists()
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    tiny_vlm.save_adapter(tmp_path / "a")
    tiny_vlm.load_adapter(tmp_path / "a")


@pytest.mark.parametrize("changes, error", [
    ({"vision_layer": -2}, "trained with vision_layer=-1, but this model has vision_layer=-2"),
    ({"keep_cls": True}, "trained with keep_cls=False, but this model has keep_cls=True"),
    ({"lm_revision": "b" * 40}, "trained with lm_revision='aaaa"),
    ({"lm_revision": None}, None),  # a pin on one side only: nothing to compare
    ({"lm_commit": "d" * 40}, "trained with lm_commit='cccc.*the hub has moved on"),  # unpinned, resolved elsewhere
    ({"lm_commit": None}, None),  # a local folder on one side: nothing to compare
    ({"lm": "google/gemma-2-2b-it"}, "warn"),
    ({"prompt_prefix": "look :"}, "warn"),
])
def test_an_adapter_trained_with_other_model_settings_is_refused_or_warned(tiny_vlm, tmp_path, changes, error):
    trained = AdapterVLM(tiny_vlm.vision, tiny_vlm.lm, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                         dataclasses.replace(tiny_vlm.config, lm_revision="a" * 40, lm_commit="c" * 40),
                         adapter=tiny_vlm.adapter)
    trained.save_adapter(tmp_path / "a")
    other = AdapterVLM(tiny_vlm.vision, tiny_vlm.lm, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                       dataclasses.replace(trained.config, **changes))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if error not in (None, "warn"):
            with pytest.raises(ValueError, match=error):
                other.load_adapter(tmp_path / "a")
            return
        other.load_adapter(tmp_path / "a")
    assert torch.equal(other.adapter.weight, tiny_vlm.adapter.weight)
    named = [str(w.message) for w in caught if "was trained with" in str(w.message)]
    assert len(named) == (error == "warn")
    if named:
        assert all(f"{key}={value!r}" in named[0] for key, value in changes.items())


def test_unloadable_model_gives_a_hint(monkeypatch, miniature):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import; no network retries
    with pytest.raises(OSError, match="Hint: without network access"):
        AdapterVLM.from_pretrained(miniature["vision"], "no-such-org/no-such-lm")


def test_llava_image_positions_match_its_expanded_image_tokens():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    image_token = 99
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4),
        image_token_index=image_token, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    prompts = [[1, 5, 6], [1, 7]]
    ids = torch.tensor([p + [image_token] * 16 + [8, 9, 10][: 5 - len(p)] for p in prompts])
    positions, mask = llava_positions(ids, image_token)
    assert positions.tolist() == [list(range(3, 19)), list(range(2, 18))]
    with torch.no_grad():  # LLaVA itself refuses image tokens that do not match its image features one to one
        out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32), output_hidden_states=True)
    assert mask.sum() == 2 * (32 // 8) ** 2  # 16 patch features per image ("default" drops CLS)
    assert out.hidden_states[0].shape[1] == ids.shape[1]
    with pytest.raises(ValueError, match="different numbers of image tokens"):
        llava_positions(torch.tensor([[image_token, 1], [1, 2]]), image_token)


def test_config_revisions_pick_snapshots_of_a_prefilled_hub_cache(miniature, tmp_path):
    """The real hub loading code, offline: ``lm_revision`` loads that commit's weights, none loads the main branch."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    old, new = "a" * 40, "b" * 40
    for repo, source in (("acme/mini-vision", miniature["vision"]), ("acme/mini-lm", miniature["lm"])):
        for commit in (old, new):
            snapshot = hub_snapshot(tmp_path, repo, commit, main=commit == new)
            shutil.copytree(source, snapshot, dirs_exist_ok=True)
    weights = snapshot / "model.safetensors"  # the main branch's LM
    save_file({k: v * 2 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    code = ("import sys; from jobs.train_adapter import ModelSection, build_model\n"
            "for revision in sys.argv[1:]:\n"
            "    vlm = build_model(ModelSection(vision='acme/mini-vision', lm='acme/mini-lm', "
            "lm_revision=revision or None, vision_revision=revision or None))\n"
            "    print('SUM', float(vlm.lm.get_input_embeddings().weight.double().sum()))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code, old, ""], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sums = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("SUM ")]
    reference = float(load_file(f"{miniature['lm']}/model.safetensors")["model.embed_tokens.weight"].double().sum())
    assert sums == pytest.approx([reference, 2 * reference]) and reference != 0
