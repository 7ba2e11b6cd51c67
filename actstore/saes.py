"""SAE suites: which SAE probes which residual state of a store, declared in YAML and loaded with sae-lens.

    name: gemma-scope-16k
    saes:
      - source: sae_lens_pretrained          # SAE.from_pretrained(release, sae_id)
        release: gemma-scope-2b-pt-res-canonical
        sae_id: layer_12/width_16k/canonical
      - source: local                        # a folder written by sae-lens (SAE.save_model)
        path: saes/layer_3
      - source: gemma_scope_npz              # a Gemma Scope params.npz (JumpReLU, no b_dec on the input)
        path: params.npz
        hook: blocks.5.hook_resid_post
        descriptions: np-5-gemmascope-res-16k.json   # optional: a Neuronpedia explanation export for this SAE
        neuronpedia_sae_id: 5-gemmascope-res-16k     # optional: keep only the export's entries of this SAE

Each SAE's store state comes from its hook (``blocks.L.hook_resid_post`` reads state L+1, ``blocks.L.hook_resid_pre``
reads state L; see the store's layer convention) or from an explicit ``state``; when both are given they must agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from actstore.stats import SAEParams

SOURCES = ("sae_lens_pretrained", "local", "gemma_scope_npz")
_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)$")


def state_of_hook(hook: str) -> int:
    """The store state a residual-stream hook reads: resid_pre of block L = state L, resid_post = state L+1."""
    match = _HOOK.search(hook)
    if match is None:
        raise ValueError(f"hook {hook!r} is not a residual-stream hook (blocks.L.hook_resid_pre / _post); "
                         "actstore stores the residual stream only")
    block, where = int(match.group(1)), match.group(2)
    return block if where == "pre" else block + 1


@dataclass
class SAESuite:
    """A named mapping from store states to SAEs, with where each came from."""

    name: str
    saes: dict[int, SAEParams]
    sources: dict[int, dict[str, Any]] = field(default_factory=dict)
    base: Path = Path(".")  # the suite file's folder: relative paths in entries are relative to it

    def check_store(self, d_model: int, states: list[int]) -> None:
        """Refuse SAEs of another width or for states the store lacks, naming each."""
        problems = [f"state {s}: SAE d_in={sae.d_in}, store d_model={d_model} ({self.sources.get(s)})"
                    for s, sae in self.saes.items() if sae.d_in != d_model]
        problems += [f"state {s}: the store has no such layer (it has {states})" for s in self.saes if s not in states]
        if problems:
            raise ValueError(f"SAE suite {self.name!r} does not fit the store:\n  " + "\n  ".join(problems))


def _hook_name(sae: Any) -> str | None:
    meta = getattr(sae.cfg, "metadata", None)
    return getattr(meta, "hook_name", None) or getattr(sae.cfg, "hook_name", None)


def _resolve_state(entry: dict[str, Any], hook: str | None, where: str) -> int:
    from_hook = state_of_hook(hook) if hook else None
    given = entry.get("state")
    if given is None and from_hook is None:
        raise ValueError(f"{where}: give 'state' (the store layer) or 'hook' for SAE entry {entry}")
    if given is not None and from_hook is not None and int(given) != from_hook:
        raise ValueError(f"{where}: entry {entry} says state {given}, but its hook {hook!r} reads state {from_hook}")
    return int(given) if given is not None else from_hook


def load_entry(entry: dict[str, Any], base: Path, where: str) -> tuple[int, SAEParams]:
    """One suite entry: (store state, SAE parameters)."""
    source = entry.get("source")
    if source not in SOURCES:
        raise ValueError(f"{where}: source must be one of {SOURCES}, got {source!r} in {entry}")
    if source == "gemma_scope_npz":
        params = np.load(base / entry["path"])
        tensor = lambda k: torch.from_numpy(np.asarray(params[k], dtype=np.float32))  # noqa: E731
        sae = SAEParams(tensor("W_enc"), tensor("b_enc"), tensor("W_dec"), tensor("b_dec"), "jumprelu",
                        threshold=tensor("threshold"), apply_b_dec_to_input=False)
        return _resolve_state(entry, entry.get("hook"), where), sae
    from sae_lens import SAE

    if source == "local":
        loaded = SAE.load_from_disk(str(base / entry["path"]), device="cpu")
    else:
        loaded = SAE.from_pretrained(entry["release"], entry["sae_id"], device="cpu")
        loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    recorded, given = _hook_name(loaded), entry.get("hook")
    if recorded and given and recorded != given:
        raise ValueError(f"{where}: entry {entry} says hook {given!r}, but the SAE was trained on {recorded!r}")
    return _resolve_state(entry, given or recorded, where), SAEParams.from_sae_lens(loaded)


def load_suite(path: str | Path) -> SAESuite:
    """Load every SAE a suite YAML declares."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if "saes" not in raw or not raw["saes"]:
        raise ValueError(f"{path}: an SAE suite needs a non-empty 'saes' list")
    saes, sources = {}, {}
    for entry in raw["saes"]:
        state, sae = load_entry(entry, path.parent, str(path))
        if state in saes:
            raise ValueError(f"{path}: two SAEs for store state {state}")
        saes[state], sources[state] = sae, entry
    return SAESuite(name=str(raw.get("name", path.stem)), saes=saes, sources=sources, base=path.parent)
