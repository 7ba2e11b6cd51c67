"""Feature descriptions (Neuronpedia import, derived from text tokens) and the semantic alignment score."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actstore.descriptions import (
    alignment_score,
    content_words,
    derive_from_text,
    load_neuronpedia,
    store_tokenizer,
    try_store_tokenizer,
)


def test_content_words_match_plurals_and_drop_stopwords():
    assert content_words("Two small red Circles on the left") == {"two", "small", "red", "circle", "left"}
    assert content_words("three crosses") == {"three", "cross"} == content_words("a cross, three")


def test_neuronpedia_export_is_filtered_by_sae_and_checked_against_the_width(tmp_path):
    path = tmp_path / "export.json"
    path.write_text(json.dumps([
        {"layer": "12-gemmascope-res-16k", "index": "2", "description": " blue objects "},
        {"layer": "12-gemmascope-res-16k", "index": "2", "description": "a second explanation"},
        {"layer": "13-gemmascope-res-16k", "index": "1", "description": "other layer"},
    ]))
    got = load_neuronpedia(path, 4, sae_id="12-gemmascope-res-16k")
    assert got.tolist() == ["", "", "blue objects", ""]
    assert load_neuronpedia(path, 4)[1] == "other layer"
    with pytest.raises(ValueError, match="latent index 2 is outside the SAE's 2 latents"):
        load_neuronpedia(path, 2)
    path.write_text(json.dumps([{"index": 0}]))
    with pytest.raises(ValueError, match="needs 'index' and 'description'"):
        load_neuronpedia(path, 4)


def test_descriptions_derived_from_top_text_tokens():
    vocabulary = {10: "red", 11: "circles", 12: "the", 13: "circle", 14: "blue"}
    text_token_id = np.array([10, 11, 12, 13, 14, 10])
    top_token = np.array([[1, 3, 0, 2], [4, -1, -1, -1], [-1, -1, -1, -1]])
    got = derive_from_text(top_token, lambda t: content_words(vocabulary[text_token_id[t]]), n_words=2)
    assert got.tolist() == ["circle, red", "blue", ""]


def test_alignment_score_and_its_random_baseline():
    descriptions = ["red", "circle", "blue", ""]
    top = np.array([[0, 1], [2, 3], [0, -1]])
    captions = ["one red circle", "one red circle", "two blue squares"]
    score, baseline = alignment_score(top, descriptions, captions)
    # image 0: both latents named (1.0); image 1: "blue" and "" not in "red circle" (0.0); image 2: "red" no (0.0)
    assert score == pytest.approx(1 / 3)
    # a random latent names a caption word with probability 2/4, 2/4, 1/4
    assert baseline == pytest.approx((0.5 + 0.5 + 0.25) / 3)


def test_a_latent_naming_two_caption_words_counts_once_in_the_baseline():
    score, baseline = alignment_score(np.array([[0]]), ["red, circle", "red", "blue"], ["one red circle"])
    assert score == 1.0 and baseline == pytest.approx(2 / 3)


def test_the_store_tokenizer_is_the_one_its_provenance_names(tmp_path, monkeypatch):
    from actstore.miniature import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "tok")  # a local name, as from_pretrained takes a hub name
    ids = build_tokenizer()("one small red circle in the center")["input_ids"]
    expected = build_tokenizer().decode(ids)
    assert "circle" in expected
    for provenance in ({"model": str(tmp_path / "tok")},  # a store written from one's own code
                       {"model": {"lm": str(tmp_path / "tok"), "llava": None}},  # a harvest's model section
                       {"model": {"llava": str(tmp_path / "tok"), "lm": None}},
                       {"model": {"lm": "miniature"}}):
        assert store_tokenizer(provenance).decode(ids) == expected, provenance
    with pytest.raises(ValueError, match="names no language model"):
        store_tokenizer({"data": {"source": "world"}})
    tokenizer, why_not = try_store_tokenizer({"model": str(tmp_path / "gone")})
    assert tokenizer is None and "did not load" in why_not and "gone" in why_not
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub.\nCheck your internet connection.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    _, why_not = try_store_tokenizer({"model": "google/gemma-2-2b"})
    assert why_not == ("the store's tokenizer did not load (OSError: We couldn't connect to the hub. Check your "
                       "internet connection.)")  # one line, for a log line or a report's list item


def sub_word_tokenizer():
    """A Gemma-style (Metaspace) BPE tokenizer trained here, small enough to split words into pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    corpus = ["three small red crosses in the center", "two large blue squares on the left"] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=50, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


def test_a_sub_word_piece_stands_for_its_whole_prompt_word():
    from actstore.descriptions import prompt_words

    tokenizer = sub_word_tokenizer()
    prompt = "three small red crosses in the center"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert len(pieces) > len(prompt.split())  # some words are split into pieces
    got = prompt_words(prompt, ids, tokenizer)
    words = iter(prompt.split())
    expected = []
    for piece in pieces:  # each piece belongs to the word it starts or continues
        if piece.startswith("▁"):
            word = next(words)
        expected.append(content_words(word))
    assert got == expected and {"cross"} in got
    assert prompt_words(prompt, ids[:4], tokenizer) == expected[:4]  # the store keeps a prompt's first tokens
    assert prompt_words("two large blue squares", ids[:4], tokenizer) is None  # not that prompt's tokens


def test_derived_descriptions_name_whole_words_of_the_store_prompts():
    import xarray as xr

    from actstore.descriptions import text_token_words

    tokenizer = sub_word_tokenizer()
    prompts = ["three small red crosses in the center", "two large blue squares on the left"]
    text_image, position, token_id = [], [], []
    for image, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:11]  # a prompt's first tokens
        text_image += [image] * len(ids)
        position += list(range(20, 20 + len(ids)))
        token_id += ids
    order = np.random.default_rng(0).permutation(len(token_id))  # the store's text tokens in any order
    ds = xr.Dataset(coords={
        "image": ("image", [0, 1]), "prompt": ("image", prompts),
        "text_image": ("text_token", np.array(text_image)[order]),
        "text_position": ("text_token", np.array(position)[order]),
        "text_token_id": ("text_token", np.array(token_id)[order])})
    words_of = text_token_words(ds, tokenizer)
    cross_pieces = [t for t in range(len(order)) if words_of(t) == {"cross"}]
    assert len(cross_pieces) >= 2  # "crosses" is more than one piece, each read as the word
    pieces = [tokenizer.convert_ids_to_tokens(int(ds.text_token_id[t])) for t in cross_pieces]
    assert any(not p.startswith("▁") for p in pieces)
    got = derive_from_text(np.array([cross_pieces + [-1]]), words_of, n_words=1)
    assert got.tolist() == ["cross"]
