"""What latents mean, and whether an image's most active latents name what is in it.

Descriptions come from auto-interp exports (Neuronpedia's explanation export: a JSON list of objects with ``index``
and ``description``, and ``modelId`` / ``layer`` naming the SAE, e.g. ``12-gemmascope-res-16k``) or, for a store
whose prompts are captions (the embedded world), are derived from each latent's top-activating text tokens, each
read as the whole prompt word it is part of.

Semantic alignment of a layer: for each image, the share of its most active latents (by activation summed over the
image's patches) whose description names a word of the image's caption; averaged over images. Its baseline is the
same share for latents drawn uniformly at random, computed exactly (the share of all latents whose description names
a caption word), so no seed is involved.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from actstore.examples import kept_top_examples

# Words that name no attribute of an image: articles, prepositions, prompt boilerplate.
STOPWORDS = frozenset(
    "a an the of on in at to and or with is are this that it its image picture photo describe there some".split()
)


def normalise(word: str) -> str:
    """Lower case and a plain plural stripped, so 'Circles' and 'circle' (and 'crosses' and 'cross') match."""
    word = word.lower()
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def content_words(text: str) -> set[str]:
    """The normalised alphabetic words of ``text`` minus stopwords."""
    return {normalise(w) for w in re.findall(r"[A-Za-z]+", text or "") if w.lower() not in STOPWORDS}


def load_neuronpedia(path: str | Path, d_sae: int, sae_id: str | None = None) -> np.ndarray:
    """Descriptions per latent (``""`` where none) from a Neuronpedia explanation export, keeping only entries of
    ``sae_id`` (Neuronpedia's ``layer`` field) when given; the first description of a latent wins."""
    raw = json.loads(Path(path).read_text())
    entries = raw.get("explanations", raw) if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of explanations (Neuronpedia export), got {type(raw).__name__}")
    out = np.full(d_sae, "", dtype=object)
    for entry in entries:
        if sae_id is not None and entry.get("layer", sae_id) != sae_id:
            continue
        try:
            index, text = int(entry["index"]), str(entry["description"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: an explanation needs 'index' and 'description', got {entry}") from exc
        if not 0 <= index < d_sae:
            raise ValueError(f"{path}: latent index {index} is outside the SAE's {d_sae} latents "
                             f"(an export of another SAE width or layer?)")
        if not out[index]:
            out[index] = text.strip()
    return out


def derive_from_text(top_token: np.ndarray, words_of: Callable[[int], set[str]], n_words: int = 2) -> np.ndarray:
    """Per latent, its most frequent content words among its top-activating text tokens (``top_token``: (latent,
    rank) indices along the store's ``text_token`` axis, -1 padded; ``words_of``: a text token's content words);
    ``""`` for latents that never fire on text."""
    out = np.full(top_token.shape[0], "", dtype=object)
    for latent, row in enumerate(top_token):
        counts: Counter[str] = Counter()
        for t in row[row >= 0]:
            counts.update(sorted(words_of(int(t))))
        out[latent] = ", ".join(word for word, _ in counts.most_common(n_words))
    return out


def prompt_words(prompt: str, ids: Sequence[int], tokenizer: Any) -> list[set[str]] | None:
    """Per token of ``ids`` (the first tokens of ``prompt`` as ``tokenizer`` splits it), the content words of the
    prompt's word(s) that the token is part of, so that a sub-word piece ("es" of "crosses") stands for its whole
    word; None where the tokenizer gives no character offsets or ``ids`` are not how it splits ``prompt``."""
    try:
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # a slow (Python) tokenizer has no offsets
        return None
    if list(encoded["input_ids"][: len(ids)]) != [int(i) for i in ids]:
        return None
    out = []
    for start, end in encoded["offset_mapping"][: len(ids)]:
        if start < end and prompt[start].isalpha():
            while start > 0 and prompt[start - 1].isalpha():
                start -= 1
        if start < end and prompt[end - 1].isalpha():
            while end < len(prompt) and prompt[end].isalpha():
                end += 1
        out.append(content_words(prompt[start:end]))
    return out


def text_token_words(ds: Any, tokenizer: Any) -> Callable[[int], set[str]]:
    """A store's text token (by index along ``text_token``) -> the content words of the whole prompt word(s) it is
    part of (:func:`prompt_words`), or of its own decoded text where its prompt's tokens cannot be matched; each
    image's prompt is tokenized once, when one of its tokens is first asked for."""
    image_of, position, token_id = ds.text_image.values, ds.text_position.values, ds.text_token_id.values
    order = np.lexsort((position, image_of))  # each image's text tokens together, in prompt order
    grouped = image_of[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if len(order) else np.array([], dtype=int)
    span_of = dict(zip(grouped[starts].tolist(), zip(starts.tolist(), np.r_[starts[1:], len(order)].tolist())))
    prompt_of = dict(zip(ds.image.values.tolist(), ds.prompt.values.tolist()))
    words: dict[int, set[str]] = {}

    def words_of(t: int) -> set[str]:
        if t not in words:
            image = int(image_of[t])
            first, stop = span_of[image]
            tokens = order[first:stop]
            ids = [int(i) for i in token_id[tokens]]
            found = prompt_words(str(prompt_of.get(image, "")), ids, tokenizer)
            for k, token in enumerate(tokens.tolist()):
                words[token] = found[k] if found is not None else content_words(tokenizer.decode([ids[k]]))
        return words[t]

    return words_of


def alignment_score(image_top_latents: np.ndarray, descriptions: Sequence[str], captions: Sequence[str]
                    ) -> tuple[float, float]:
    """(score, random-latent baseline) of one layer: ``image_top_latents`` is (images, m), -1 padded."""
    described = [content_words(d) for d in descriptions]
    # word -> latents whose description names it: an image's baseline is then the union over its few caption words,
    # not a pass over every latent per image (1M images x 16k latents would not finish).
    naming: dict[str, set[int]] = {}
    for latent, words in enumerate(described):
        for word in words:
            naming.setdefault(word, set()).add(latent)
    scores, baselines = [], []
    for latents, caption in zip(image_top_latents, captions):
        words = content_words(caption)
        latents = latents[latents >= 0]
        if not words or not len(latents):
            continue
        scores.append(np.mean([bool(described[j] & words) for j in latents]))
        baselines.append(len(set().union(*(naming.get(w, ()) for w in words))) / len(described))
    if not scores:
        return float("nan"), float("nan")
    return float(np.mean(scores)), float(np.mean(baselines))


def store_tokenizer(provenance: dict[str, Any]) -> Any:
    """The tokenizer of the LM a store was harvested from (the miniature's, or transformers' ``from_pretrained`` of the
    name its provenance gives: a harvest's ``model`` section, or a plain ``model`` name as a store written from one's
    own code may give); a ValueError where it names none."""
    model = provenance.get("model")
    name = model if isinstance(model, str) else (model.get("llava") or model.get("lm")) if isinstance(model, dict) \
        else None
    if name == "miniature":
        from actstore.miniature import build_tokenizer

        return build_tokenizer()
    if not name:
        raise ValueError("the store's provenance names no language model ('model'), whose tokenizer would decode its "
                         "text tokens")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def try_store_tokenizer(provenance: dict[str, Any]) -> tuple[Any | None, str]:
    """(the store's tokenizer, "") or (None, why it did not load): an analysis or report goes on without it."""
    try:
        return store_tokenizer(provenance), ""
    except Exception as exc:  # offline without it cached, no model named, a name gone from the hub, ...
        return None, f"the store's tokenizer did not load ({type(exc).__name__}: {' '.join(str(exc).split())})"


def suite_descriptions(suite: Any, stats: Any, ds: Any) -> tuple[np.ndarray, dict[int, str]]:
    """(layer, latent) descriptions for every layer of ``stats``: the suite entry's Neuronpedia export where it names
    one, else derived from the store's text tokens (needs ``top_k`` statistics); and where each layer's came from."""
    out = np.full((stats.sizes["layer"], stats.sizes["latent"]), "", dtype=object)
    source: dict[int, str] = {}
    tokenizer, why_not, tried, words_of = None, "", False, None
    for i, layer in enumerate(int(x) for x in stats.layer.values):
        entry = suite.sources.get(layer, {})
        if entry.get("descriptions"):
            path = Path(suite.base) / entry["descriptions"]
            out[i] = load_neuronpedia(path, stats.sizes["latent"], entry.get("neuronpedia_sae_id"))
            source[layer] = f"neuronpedia:{path}"
        elif "text" in stats.kind.values and kept_top_examples(stats):
            if not tried:  # once for every layer: a tokenizer that did not load will not load for the next
                tokenizer, why_not = try_store_tokenizer(ds.attrs.get("provenance", {}))
                tried = True
            if tokenizer is None:
                source[layer] = f"none: {why_not}"
                continue
            if words_of is None:  # one for every layer: each prompt is tokenized once
                words_of = text_token_words(ds, tokenizer)
            out[i] = derive_from_text(stats.top_token.sel(layer=layer, kind="text").values, words_of)
            source[layer] = "derived from top-activating text tokens"
        else:
            source[layer] = "none"
    return out, source
