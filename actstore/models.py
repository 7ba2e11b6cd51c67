"""The model under study: a frozen vision tower -> a trained linear adapter (per patch) -> a frozen causal LM.

Input template (one sequence per image)::

    [BOS] [prompt_prefix tokens] [image tokens: adapter(vision patches)] [text tokens] [EOS if training]

``text`` is the caption when training the adapter (the loss is on the text tokens and EOS only) and the prompt
when harvesting. Every batch reports where the image tokens and the text tokens are, so the harvester reads the
residual stream at exactly those positions. Only ``adapter`` has trainable parameters; the vision tower and the LM
are frozen and always run in eval mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from actstore.devices import to_device

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class AdapterConfig:
    """Identity and shape of an adapter: which vision tower and LM it connects, and how."""

    vision: str
    lm: str
    d_vision: int
    d_model: int
    vision_layer: int = -1
    keep_cls: bool = False
    prompt_prefix: str = ""
    vision_revision: str | None = None
    lm_revision: str | None = None
    # The hub commits the towers were loaded from (None for local folders): an unpinned name resolves to whatever the
    # hub holds that day, and an adapter only fits the weights it was trained on.
    vision_commit: str | None = None
    lm_commit: str | None = None
    template: str = "[BOS] [prompt_prefix] [image tokens] [text] [EOS when training]"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class VLMBatch:
    """A batch laid out by the template, with the positions of image and text tokens."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    input_ids: torch.Tensor  # image slots hold pad ids; use image_positions to find them
    image_positions: torch.Tensor  # (B, T_image) sequence positions of the image tokens
    text_mask: torch.Tensor  # (B, S) True at the text tokens (prompt or caption, not BOS/prefix/EOS/padding)
    # CPU copies, so that the harvester finds text tokens and their ids without waiting for the device.
    host_text_mask: torch.Tensor
    host_input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None  # for models that place image features themselves (LLaVA)

    def text_positions(self, i: int) -> torch.Tensor:
        """Sequence positions of the text tokens of example ``i``."""
        return self.text_mask[i].nonzero().flatten()

    def host_text_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(example, position) of every text token in row-major order, on the CPU."""
        return self.host_text_mask.nonzero(as_tuple=True)

    def first_text_tokens(self, n: int) -> "VLMBatch":
        """This batch with only the first ``n`` text tokens of each example marked as text. The LM is causal, so the
        residuals at those tokens are those of the prompt cut to ``n`` tokens: nothing later in the prompt reaches
        them."""
        mask = self.host_text_mask & (self.host_text_mask.cumsum(1) <= n)
        return replace(self, host_text_mask=mask, text_mask=to_device(mask, self.text_mask.device))


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients of every parameter and put the module in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _load_hint(kind: str, name: str, exc: Exception) -> OSError:
    return OSError(
        f"could not load the {kind} {name!r}: {exc}\nHint: without network access, pass a local directory that "
        "holds the model (save_pretrained) or pre-fill the Hugging Face cache; `actstore demo` needs no download."
    )


def load_vision_tower(name: str, revision: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The vision encoder of a CLIP / SigLIP (or any AutoModel) checkpoint."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
        cls = {"clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel, "siglip": SiglipVisionModel,
               "siglip_vision_model": SiglipVisionModel}.get(config.model_type, AutoModel)
        return cls.from_pretrained(name, revision=revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise _load_hint("vision tower", name, exc) from exc


def load_lm(name: str, revision: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM checkpoint."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError) as exc:
        raise _load_hint("language model", name, exc) from exc


class AdapterVLM(nn.Module):
    """Frozen vision tower + trainable ``nn.Linear(d_vision, d_model)`` per patch + frozen causal LM."""

    def __init__(
        self, vision: nn.Module, lm: nn.Module, tokenizer: Any, image_processor: Callable[..., Any],
        config: AdapterConfig, adapter: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.vision = freeze(vision)
        self.lm = freeze(lm)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.adapter = adapter if adapter is not None else nn.Linear(config.d_vision, config.d_model)
        if (self.adapter.in_features, self.adapter.out_features) != (config.d_vision, config.d_model):
            raise ValueError(
                f"adapter maps {self.adapter.in_features} -> {self.adapter.out_features}, but the vision tower gives "
                f"d_vision={config.d_vision} and the LM has d_model={config.d_model}"
            )
        self._has_cls = getattr(vision.config, "model_type", "").startswith("clip")

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, vision: str, lm: str, adapter: str | Path | None = None, *, vision_layer: int = -1,
        keep_cls: bool = False, prompt_prefix: str = "", dtype: torch.dtype | None = None,
        vision_revision: str | None = None, lm_revision: str | None = None,
    ) -> "AdapterVLM":
        """Load the vision tower, LM, tokenizer and image processor with transformers; an adapter folder if given."""
        from transformers import AutoImageProcessor, AutoTokenizer

        # Each hub name is resolved to one commit first and everything of it is loaded from that commit, which the
        # model records: weights, tokenizer and processor cannot come from two states of a repository.
        commits = {part: commit for part, commit in (("vision", resolve_commit(vision, vision_revision)),
                                                     ("lm", resolve_commit(lm, lm_revision))) if commit}
        vision_at, lm_at = commits.get("vision", vision_revision), commits.get("lm", lm_revision)
        vision_model = load_vision_tower(vision, vision_at, dtype)
        lm_model = load_lm(lm, lm_at, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(lm, revision=lm_at)
            processor = AutoImageProcessor.from_pretrained(vision, revision=vision_at)
        except (OSError, ValueError) as exc:
            raise _load_hint("tokenizer / image processor of", f"{lm} / {vision}", exc) from exc
        vcfg = getattr(vision_model.config, "vision_config", vision_model.config)
        config = AdapterConfig(
            vision=vision, lm=lm, d_vision=vcfg.hidden_size, d_model=lm_model.config.hidden_size,
            vision_layer=vision_layer, keep_cls=keep_cls, prompt_prefix=prompt_prefix,
            vision_revision=vision_revision, lm_revision=lm_revision,
            vision_commit=commits.get("vision"), lm_commit=commits.get("lm"),
        )
        model = cls(vision_model, lm_model, tokenizer, processor, config)
        if adapter is not None:
            model.load_adapter(adapter)
        return model

    @property
    def commits(self) -> dict[str, str]:
        """The hub commit each tower was loaded from, by part (none for towers loaded from local folders)."""
        parts = (("vision", self.config.vision_commit), ("lm", self.config.lm_commit))
        return {part: commit for part, commit in parts if commit}

    def train(self, mode: bool = True) -> "AdapterVLM":
        """Only the adapter changes mode; the frozen towers stay in eval (no dropout, fixed norms)."""
        self.training = mode
        self.adapter.train(mode)
        self.vision.eval()
        self.lm.eval()
        return self

    # ---- adapter files ----------------------------------------------------------------------------------------
    def save_adapter(self, directory: str | Path) -> str:
        """Write ``adapter.safetensors`` + ``adapter_config.json``; returns the weights' sha256."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()}
        # Each file through a temporary and a rename, the weights last: their presence is what says "trained" (the
        # demo skips training when they exist), so a save stopped midway never leaves weights without a config.
        config = directory / f".{ADAPTER_CONFIG}.partial"
        config.write_text(json.dumps(self.config.to_json(), indent=2))
        os.replace(config, directory / ADAPTER_CONFIG)
        weights = directory / f".{ADAPTER_WEIGHTS}.partial"
        save_file(state, str(weights))
        os.replace(weights, directory / ADAPTER_WEIGHTS)
        return adapter_sha256(directory)

    def load_adapter(self, directory: str | Path) -> None:
        """Load adapter weights saved by :meth:`save_adapter`, refusing ones made for other dimensions, vision
        features or pinned revisions, and warning when they were trained with towers of other names."""
        from safetensors.torch import load_file

        directory = Path(directory)
        saved = json.loads((directory / ADAPTER_CONFIG).read_text())
        if (saved["d_vision"], saved["d_model"]) != (self.config.d_vision, self.config.d_model):
            raise ValueError(
                f"adapter in {directory} maps d_vision={saved['d_vision']} -> d_model={saved['d_model']} "
                f"({saved['vision']} -> {saved['lm']}), but this model needs {self.config.d_vision} -> "
                f"{self.config.d_model} ({self.config.vision} -> {self.config.lm})"
            )
        ours = self.config.to_json()
        # Same shapes, other inputs: an adapter trained on another vision layer or other weights maps features it
        # never saw, with no error anywhere downstream. Revisions and commits count only where both sides have one.
        wrong = [key for key in ("vision_layer", "keep_cls") if saved.get(key, ours[key]) != ours[key]]
        wrong += [key for key in ("vision_revision", "lm_revision", "vision_commit", "lm_commit")
                  if saved.get(key) is not None and ours[key] is not None and saved[key] != ours[key]]
        def settings(config: dict[str, Any], keys: list[str]) -> str:
            return ", ".join(f"{key}={config[key]!r}" for key in keys)

        if wrong:
            hint = ("; the hub has moved on since it was trained: pin model.vision_revision / model.lm_revision to the "
                    "commit it was trained on" if any(key.endswith("_commit") for key in wrong)
                    else "; use the model settings of its training config")
            raise ValueError(f"adapter in {directory} was trained with {settings(saved, wrong)}, but this model has "
                             f"{settings(ours, wrong)}{hint}")
        # Names may differ for the same weights (a hub id here, a local copy there), so these only warn.
        renamed = [key for key in ("vision", "lm", "prompt_prefix") if saved.get(key, ours[key]) != ours[key]]
        if renamed:
            warnings.warn(f"adapter in {directory} was trained with {settings(saved, renamed)}; this model has "
                          f"{settings(ours, renamed)}", stacklevel=2)
        state = load_file(str(directory / ADAPTER_WEIGHTS))
        self.adapter.load_state_dict({k: v.to(self.adapter.weight.dtype) for k, v in state.items()})

    # ---- forward ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the adapter lives."""
        return self.adapter.weight.device

    def host_pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """Preprocess PIL images / HxWx3 arrays with the vision tower's own image processor, on the host (a loader
        thread may call this while the model runs)."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """Preprocess PIL images / HxWx3 arrays with the vision tower's own image processor, on the model's device."""
        return self.to_model(self.host_pixel_values(images))

    def to_model(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Host pixel values on the model's device, in its vision tower's dtype."""
        return to_device(pixel_values, self.device, next(self.vision.parameters()).dtype)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T_image, d_model): the adapter applied to each patch of the chosen vision hidden state."""
        with torch.no_grad():
            states = self.vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states
            patches = states[self.config.vision_layer]
            if self._has_cls and not self.config.keep_cls:
                patches = patches[:, 1:]
        return self.adapter(patches.to(self.adapter.weight.dtype))

    def build_batch(
        self, pixel_values: torch.Tensor, texts: Sequence[str], *, add_eos: bool = False,
        image_embeds: torch.Tensor | None = None,
    ) -> VLMBatch:
        """Lay out [BOS][prefix][image][text][EOS?] per example, right-padded, with labels on text (+EOS)."""
        tok = self.tokenizer
        embed = self.lm.get_input_embeddings()
        img = self.image_embeds(pixel_values) if image_embeds is None else image_embeds
        B, T = img.shape[:2]
        prompt_prefix = self.config.prompt_prefix
        prefix = tok(prompt_prefix, add_special_tokens=False)["input_ids"] if prompt_prefix else []
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        texts_ids = [tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if add_eos else [])
                     for t in texts]
        head = len(bos) + len(prefix)
        S = head + T + max(len(t) for t in texts_ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.full((B, S), pad, dtype=torch.long)
        attention = torch.zeros((B, S), dtype=torch.long)
        labels = torch.full((B, S), -100, dtype=torch.long)
        text_mask = torch.zeros((B, S), dtype=torch.bool)
        for i, ids in enumerate(texts_ids):
            input_ids[i, :head] = torch.tensor(bos + prefix, dtype=torch.long)
            input_ids[i, head + T : head + T + len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, : head + T + len(ids)] = 1
            labels[i, head + T : head + T + len(ids)] = torch.tensor(ids, dtype=torch.long)
            n_text = len(ids) - (1 if add_eos else 0)
            text_mask[i, head + T : head + T + n_text] = True
        host_input_ids, host_text_mask = input_ids, text_mask
        input_ids, attention, labels, text_mask = (to_device(t, self.device)
                                                   for t in (input_ids, attention, labels, text_mask))
        with torch.no_grad():
            embeds = embed(input_ids)
        image_positions = torch.arange(head, head + T, device=self.device).expand(B, T)
        embeds = torch.cat([embeds[:, :head], img.to(embeds.dtype), embeds[:, head + T :]], dim=1)
        return VLMBatch(embeds, attention, labels, input_ids, image_positions, text_mask,
                        host_text_mask=host_text_mask, host_input_ids=host_input_ids)

    def host_inputs(self, image: Any, text: str) -> torch.Tensor:
        """One example's model inputs on the host, for a loader thread to prepare while the model runs: the image's
        preprocessed pixels (1 x C x H x W); ``text`` is tokenized with its batch."""
        return self.host_pixel_values([image])

    def batch_from_host(self, inputs: Sequence[torch.Tensor], texts: Sequence[str]) -> VLMBatch:
        """The batch of examples whose :meth:`host_inputs` were prepared ahead, with their prompts."""
        return self.build_batch(self.to_model(torch.cat(list(inputs))), texts)

    def prepare(self, images: Sequence[Any], texts: Sequence[str]) -> VLMBatch:
        """The batch for raw images and their prompts (what the harvester calls)."""
        return self.build_batch(self.pixel_values(images), texts)

    def run_decoder(self, batch: VLMBatch) -> None:
        """Run the LM's decoder blocks on the batch (no LM head): what hooks on the blocks observe."""
        self.lm.get_decoder()(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, use_cache=False)

    def forward(self, batch: VLMBatch, output_hidden_states: bool = False) -> Any:
        """The LM on the batch; ``.loss`` is the mean next-token loss over text (and EOS) tokens."""
        return self.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, labels=batch.labels,
                       output_hidden_states=output_hidden_states)

    def token_losses(self, batch: VLMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of next-token losses over the labelled tokens, and their number (for exact global averaging)."""
        logits = self.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
        shifted = batch.labels[:, 1:]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100,
            reduction="sum",
        )
        return loss, (shifted != -100).sum()


def resolve_commit(name: str, revision: str | None = None) -> str | None:
    """The hub commit that ``name`` at ``revision`` (None: the default branch) points to now, found the way a load
    finds it: by resolving its config.json (from the Hugging Face cache when offline); None for a local folder or
    when it cannot be resolved (the load itself then says why)."""
    if os.path.exists(name):
        return None
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(name, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - any failure to resolve: the load reports it in its own words
        return None
    match = re.search(r"snapshots/([0-9a-f]{40})/", Path(path).as_posix())
    return match.group(1) if match else None


def adapter_sha256(directory: str | Path) -> str:
    """sha256 of a saved adapter's weights file (the store's provenance records it)."""
    return hashlib.sha256((Path(directory) / ADAPTER_WEIGHTS).read_bytes()).hexdigest()


def llava_positions(input_ids: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_image) sequence positions of a LLaVA batch's expanded image tokens, and the (B, S) image-token mask."""
    mask = input_ids == image_token_id
    counts = mask.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(f"examples have different numbers of image tokens: {counts.tolist()}")
    positions = mask.nonzero()[:, 1].reshape(input_ids.shape[0], -1)
    return positions, mask


# What a LLaVA prompt is without a chat format: the image, then the text. Checkpoints tuned on a chat format (llava-1.5:
# "USER: <image>\n{text} ASSISTANT:") read best in theirs, which a harvest config names as model.llava_template.
LLAVA_TEMPLATE = "<image>\n{text}"


def check_llava_template(template: str, processor: Any = None) -> None:
    """Refuse a LLaVA prompt template that does not place ``{text}`` exactly once (and no other field), nor, given
    the processor, its image token."""
    try:
        filled = template.format(text="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"the LLaVA prompt template {template!r} has a field other than {{text}} ({exc!r}); write a "
                         "literal brace as {{ or }}") from None
    if template.count("{text}") != 1 or "{text}" in filled:
        raise ValueError(f"the LLaVA prompt template {template!r} must hold {{text}} (where harvest.prompt goes) once")
    image_token = getattr(processor, "image_token", None)
    if image_token is not None and template.count(image_token) != 1:
        raise ValueError(f"the LLaVA prompt template {template!r} must hold the processor's image token "
                         f"{image_token!r} once, where the image goes")


class LlavaVLM(nn.Module):
    """A transformers LLaVA-family model (``LlavaForConditionalGeneration`` + its processor) as the model under study.

    Template: the processor's expansion of ``prompt_template`` (default ``LLAVA_TEMPLATE``), which holds the
    processor's image token and ``{text}`` once each. Image positions are the expanded image tokens; text positions
    are the non-padding tokens after the last image token (a chat format's closing words among them).
    """

    def __init__(self, model: nn.Module, processor: Any, prompt_template: str = LLAVA_TEMPLATE) -> None:
        super().__init__()
        check_llava_template(prompt_template, processor)
        self.model = freeze(model)
        self.processor = processor
        self.commits: dict[str, str] = {}  # {"llava": hub commit} when loaded by name (from_pretrained sets it)
        self.prompt_template = prompt_template
        self.image_token_id = model.config.image_token_index

    @classmethod
    def from_pretrained(cls, name: str, *, revision: str | None = None, dtype: torch.dtype | None = None,
                        prompt_template: str = LLAVA_TEMPLATE) -> "LlavaVLM":
        """Load model and processor with transformers."""
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        commit = resolve_commit(name, revision)  # one commit for model and processor, recorded (see AdapterVLM)
        try:
            model_type = AutoConfig.from_pretrained(name, revision=commit or revision).model_type
            processor = AutoProcessor.from_pretrained(name, revision=commit or revision)
        except (OSError, ValueError) as exc:
            raise _load_hint("LLaVA model", name, exc) from exc
        if model_type != "llava":  # transformers would only warn, and load what it could into the wrong layout
            raise ValueError(f"model.llava names a {model_type!r} checkpoint ({name}); actstore harvests "
                             "LlavaForConditionalGeneration checkpoints (model_type 'llava'), whose images are a fixed "
                             "number of tokens (LLaVA-NeXT's and OneVision's vary with the image's size)")
        check_llava_template(prompt_template, processor)  # before the weights load, which takes minutes for a 7B
        try:
            model = LlavaForConditionalGeneration.from_pretrained(name, revision=commit or revision, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise _load_hint("LLaVA model", name, exc) from exc
        vlm = cls(model, processor, prompt_template)
        vlm.commits = {"llava": commit} if commit else {}
        return vlm

    @property
    def lm(self) -> nn.Module:
        """The language model (whose decoder blocks the harvester hooks)."""
        return self.model.model.language_model

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.model.parameters()).device

    def host_inputs(self, image: Any, text: str) -> dict[str, torch.Tensor]:
        """One example's processor outputs on the host, for a loader thread to prepare while the model runs: its pixel
        values and the ids of its templated prompt with the image tokens expanded."""
        enc = self.processor(images=[image], text=[self.prompt_template.format(text=text)], return_tensors="pt")
        return {"input_ids": enc["input_ids"][0], "pixel_values": enc["pixel_values"]}

    def batch_from_host(self, inputs: Sequence[dict[str, torch.Tensor]], texts: Sequence[str]) -> VLMBatch:
        """The batch of examples whose :meth:`host_inputs` were prepared ahead, padded as the processor pads a batch
        (``texts`` are already in their ids)."""
        # Padded here rather than by tokenizer.pad: a loader thread may be inside the same tokenizer meanwhile, and a
        # fast tokenizer's padding settings are shared state ("Already borrowed" when two threads change them).
        tokenizer = self.processor.tokenizer
        rows = [x["input_ids"] for x in inputs]
        length = max(len(row) for row in rows)
        if tokenizer.pad_token_id is None and any(len(row) < length for row in rows):
            raise ValueError("the LLaVA tokenizer has no pad token, so prompts of different lengths cannot be batched")
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id or 0, dtype=rows[0].dtype)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            where = slice(length - len(row), length) if tokenizer.padding_side == "left" else slice(0, len(row))
            input_ids[i, where], attention[i, where] = row, 1
        pixel_values = torch.cat([x["pixel_values"] for x in inputs])
        # Positions are found on the CPU (where the processor left them), then everything moves without a sync.
        positions, _ = llava_positions(input_ids, self.image_token_id)
        after_image = torch.arange(input_ids.shape[1])[None, :] > positions[:, -1:]
        text_mask = after_image & attention.bool()
        device = self.device
        return VLMBatch(
            inputs_embeds=None, attention_mask=to_device(attention, device),
            labels=to_device(torch.full_like(input_ids, -100), device), input_ids=to_device(input_ids, device),
            image_positions=to_device(positions, device), text_mask=to_device(text_mask, device),
            host_text_mask=text_mask, host_input_ids=input_ids,
            pixel_values=to_device(pixel_values, device, next(self.model.parameters()).dtype),
        )

    def prepare(self, images: Sequence[Any], texts: Sequence[str]) -> VLMBatch:
        """Tokenize the templated prompts, expand the image tokens, and locate image and text positions."""
        return self.batch_from_host([self.host_inputs(image, text) for image, text in zip(images, texts)], texts)

    def run_decoder(self, batch: VLMBatch) -> None:
        """LLaVA's own forward without the LM head: it places the image features, then runs the decoder blocks."""
        self.model.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                         attention_mask=batch.attention_mask, use_cache=False)

    def image_token_count(self) -> int:
        """Image tokens per image."""
        cfg = self.model.config.vision_config
        n = (cfg.image_size // cfg.patch_size) ** 2
        return n if self.model.config.vision_feature_select_strategy == "default" else n + 1
