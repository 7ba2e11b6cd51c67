"""The embedded miniature: a tiny CLIP-style ViT and a tiny Gemma-2-style LM, built from the real transformers
config classes with an offline word-level tokenizer, briefly pretrained on the generated world so that they have
real features, and cached on disk. ``AdapterVLM.from_pretrained`` then loads them with the real loading code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # transformers is imported where a miniature is built, not when actstore is
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        Gemma2Config,
        Gemma2ForCausalLM,
        PreTrainedTokenizerFast,
    )

import numpy as np
import torch
from torch import nn

from actstore import world

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
PROMPT_WORDS = ["describe", "image", "this", "is", "a", "picture", "of", "what", "do", "you", "see", ".", "?", ":",
                "shape", "colour", "size", "there", "are", "and"]
CACHE_VERSION = 1


@dataclass(frozen=True)
class MiniatureSpec:
    """Sizes and training budget of the miniature (the cache key)."""

    vision_hidden: int = 64
    vision_layers: int = 3
    lm_hidden: int = 64
    lm_layers: int = 4
    vision_steps: int = 300
    lm_steps: int = 400
    seed: int = 0


def default_cache_dir() -> Path:
    """Where built miniatures live: $ACTSTORE_CACHE or ~/.cache/actstore."""
    return Path(os.environ.get("ACTSTORE_CACHE", Path.home() / ".cache" / "actstore"))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the world's vocabulary and prompt words, built with no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + sorted(set(world.vocabulary()) | set(PROMPT_WORDS))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def vision_config(spec: MiniatureSpec) -> CLIPVisionConfig:
    """A CLIP vision tower: 32x32 images in 8x8 patches, 16 image tokens (+ CLS)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden, num_hidden_layers=spec.vision_layers,
        num_attention_heads=4, image_size=world.IMAGE_SIZE, patch_size=8, projection_dim=spec.vision_hidden,
    )


def lm_config(spec: MiniatureSpec, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> Gemma2Config:
    """A Gemma-2 LM (the architecture of the real study's Gemma-2-2B), a few layers wide."""
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab_size, hidden_size=spec.lm_hidden, intermediate_size=3 * spec.lm_hidden,
        num_hidden_layers=spec.lm_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, sliding_window=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation="eager",
    )


def image_processor() -> CLIPImageProcessor:
    """Preprocessing for the miniature ViT: no resizing, values scaled to [-1, 1]."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )


def _labels(rows: list[dict]) -> dict[str, torch.Tensor]:
    tables = {"shape": world.SHAPES, "colour": tuple(world.COLOURS), "size": tuple(world.SIZES),
              "count": world.COUNTS, "position": (None, *world.POSITIONS)}
    return {k: torch.tensor([tables[k].index(r[k]) for r in rows]) for k in tables}


def pretrain_vision(spec: MiniatureSpec, log: Callable[[str], None] = print) -> CLIPVisionModel:
    """Train the ViT to classify every attribute from its patch tokens (so that patches carry the features)."""
    from transformers import CLIPVisionModel

    torch.manual_seed(spec.seed)
    model = CLIPVisionModel(vision_config(spec))
    n_classes = {"shape": 4, "colour": len(world.COLOURS), "size": 2, "count": 3, "position": 6}
    heads = nn.ModuleDict({k: nn.Linear(spec.vision_hidden, n) for k, n in n_classes.items()})
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    processor = image_processor()
    rows = world.generate(4096, seed=spec.seed + 101)
    pixels = processor(images=[r["image"] for r in rows], return_tensors="pt")["pixel_values"]
    labels = _labels(rows)
    g = torch.Generator().manual_seed(spec.seed)
    for step in range(spec.vision_steps):
        idx = torch.randint(0, len(rows), (64,), generator=g)
        hidden = model(pixel_values=pixels[idx]).last_hidden_state[:, 1:].mean(1)
        loss = sum(nn.functional.cross_entropy(heads[k](hidden), labels[k][idx]) for k in heads)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == spec.vision_steps - 1:
            log(f"[miniature] vision step {step}: attribute loss {loss.item():.3f}")
    return model.eval()


def lm_corpus(n: int, seed: int) -> list[str]:
    """Captions and simple sentences about the world."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = world.sample_scene(rng)
        templates = [
            scene.caption(),
            f"this is a picture of {scene.caption()}",
            f"the {scene.shape} is {scene.colour}",
            f"a {scene.size} {scene.shape} and a {scene.colour} {scene.shape}",
            f"what do you see ? {scene.caption()}",
        ]
        out.append(templates[rng.integers(len(templates))])
    return out


def pretrain_lm(spec: MiniatureSpec, tokenizer: PreTrainedTokenizerFast,
                log: Callable[[str], None] = print) -> Gemma2ForCausalLM:
    """Train the LM on captions and sentences of the world (next-token loss)."""
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(spec.seed)
    model = Gemma2ForCausalLM(lm_config(spec, len(tokenizer), tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    corpus = lm_corpus(8192, spec.seed + 202)
    g = torch.Generator().manual_seed(spec.seed)
    for step in range(spec.lm_steps):
        idx = torch.randint(0, len(corpus), (64,), generator=g).tolist()
        enc = tokenizer(["<bos> " + corpus[i] + " <eos>" for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == spec.lm_steps - 1:
            log(f"[miniature] LM step {step}: loss {loss.item():.3f}")
    return model.eval()


def build_miniature(
    cache_dir: str | Path | None = None, spec: MiniatureSpec = MiniatureSpec(), log: Callable[[str], None] = print
) -> dict[str, str]:
    """Build (once) and cache the miniature's vision tower and LM; returns their local paths."""
    key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **asdict(spec)}, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir or default_cache_dir()) / f"miniature-{key}"
    paths = {"vision": str(root / "vision"), "lm": str(root / "lm")}
    if (root / "complete").exists():
        return paths
    log(f"[miniature] building the tiny ViT and LM into {root} (once)")
    tokenizer = build_tokenizer()
    vision = pretrain_vision(spec, log)
    lm = pretrain_lm(spec, tokenizer, log)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    vision.save_pretrained(tmp / "vision")
    image_processor().save_pretrained(tmp / "vision")
    lm.save_pretrained(tmp / "lm")
    tokenizer.save_pretrained(tmp / "lm")
    (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    (tmp / "complete").touch()
    if not root.exists():
        tmp.rename(root)  # atomic: concurrent builders (DDP ranks) never see a half-written cache
    return paths
