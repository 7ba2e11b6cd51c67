"""Train the linear adapter of an AdapterVLM: next-token loss on caption tokens only, adapter parameters only.

    actstore train-adapter --config jobs/configs/demo.yaml [--out DIR] [--resume]
    torchrun --nproc-per-node N -m jobs.train_adapter --config ... [--resume]

Each optimizer step takes a global batch of ``batch_size`` examples chosen as a function of the step alone, splits
it over ranks and micro-batches, and normalises the loss by the global number of caption tokens, so N processes
compute the same update as one, and a resumed run the same as an uninterrupted one. Only the adapter's gradients
are all-reduced.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from actstore import world
from actstore.data import check_source, prefetched, train_and_held_out
from actstore.models import LLAVA_TEMPLATE, AdapterVLM, check_llava_template
from actstore.progress import counted, progress
from jobs.config import parse_sections


@dataclass
class ModelSection:
    """Which towers to connect: a hub name / local path each, or ``miniature`` for the embedded default."""

    vision: str = "miniature"
    lm: str = "miniature"
    llava: str | None = None  # a LLaVA-family checkpoint instead of vision + adapter + lm (harvest only)
    vision_layer: int = -1
    keep_cls: bool = False
    prompt_prefix: str = ""
    dtype: str = "float32"
    # Hub revisions (a commit hash pins the weights; stores record them in their provenance): None is the default branch
    vision_revision: str | None = None
    lm_revision: str | None = None
    llava_revision: str | None = None
    # LLaVA only: the prompt around the image, in the checkpoint's chat format ({text}: the harvest's prompt filled in)
    llava_template: str = LLAVA_TEMPLATE

    def __post_init__(self) -> None:
        check_llava_template(self.llava_template)
        if self.llava_template != LLAVA_TEMPLATE and not self.llava:
            raise ValueError("model.llava_template applies to a LLaVA checkpoint only; name one as model.llava, or "
                             "leave the template out (an adapter model's prompt is model.prompt_prefix + the prompt)")


@dataclass
class DataSection:
    """Data: the generated ``world``, a dataset on disk, or a hub dataset (see actstore.data).

    Held-out examples come from ``eval_split`` / ``eval_path`` (another split or file of the same source) when given,
    else from the end of the training data, which training then leaves out."""

    source: str = "world"
    path: str | None = None  # a file or folder; for source "hub", a hub dataset id (or a local dataset folder)
    image_column: str = "image"
    text_column: str = "caption"
    n_train: int = 4096
    n_eval: int = 256
    seed: int = 0
    split: str = "train"
    eval_split: str | None = None
    eval_path: str | None = None
    name: str | None = None  # hub only: the dataset's configuration
    revision: str | None = None  # hub only: a branch, tag or commit (a commit pins the data)

    def __post_init__(self) -> None:
        # When the config is read: otherwise a harvest or training names a bad section only once its model has loaded.
        check_source(self.source, self.path, self.name, self.revision)


@dataclass
class TrainSection:
    """Optimisation."""

    steps: int = 300
    batch_size: int = 32
    micro_batch: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    checkpoint_every: int = 100
    eval_every: int = 100
    bf16: bool = True
    seed: int = 0
    loader_threads: int = 4  # per process: threads that decode and preprocess images, the next step's ahead


@dataclass
class TrainConfig:
    """A train-adapter job (YAML: sections model, data, train, and out)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    out: str = "runs/adapter"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Load and validate a YAML config; unknown keys are errors that name the key."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "TrainConfig":
        """Build from a dict, naming unknown keys."""
        sections = {"model": ModelSection, "data": DataSection, "train": TrainSection}
        unknown = set(raw) - set(sections) - {"out", "harvest", "adapter"}  # the last two belong to the harvest job
        if unknown:
            raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)}; expected {sorted(sections)} and out")
        cfg = cls(**parse_sections(raw, sections, where), out=raw.get("out", cls.out))
        if cfg.train.batch_size % cfg.train.micro_batch and cfg.train.micro_batch < cfg.train.batch_size:
            raise ValueError(f"{where}: train.micro_batch must divide train.batch_size")
        if cfg.model.llava:  # before its weights load, not at the first step, which would find no adapter
            raise ValueError(f"{where}: model.llava names a LLaVA checkpoint, whose projector is trained already; "
                             "train-adapter trains the linear adapter between model.vision and model.lm (harvest "
                             "the LLaVA checkpoint as it is with `actstore harvest`)")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (recorded in checkpoints and stores)."""
        from dataclasses import asdict

        return asdict(self)


# ---- model and data --------------------------------------------------------------------------------------------
def build_model(section: ModelSection, adapter: str | Path | None = None, log: Callable[..., None] = print) -> Any:
    """The model a config names: an AdapterVLM (``miniature`` builds and loads the embedded tiny towers), or a
    LlavaVLM when ``llava`` names a checkpoint."""
    if section.llava:
        from actstore.models import LlavaVLM

        return LlavaVLM.from_pretrained(section.llava, revision=section.llava_revision,
                                        dtype=getattr(torch, section.dtype), prompt_template=section.llava_template)
    vision, lm = section.vision, section.lm
    if "miniature" in (vision, lm):
        from actstore.miniature import build_miniature

        paths = build_miniature(log=log)
        vision = paths["vision"] if vision == "miniature" else vision
        lm = paths["lm"] if lm == "miniature" else lm
    dtype = getattr(torch, section.dtype)
    return AdapterVLM.from_pretrained(vision, lm, adapter, vision_layer=section.vision_layer,
                                      keep_cls=section.keep_cls, prompt_prefix=section.prompt_prefix, dtype=dtype,
                                      vision_revision=section.vision_revision, lm_revision=section.lm_revision)


def load_examples(section: DataSection) -> tuple[Any, Any]:
    """The training and the held-out examples, each a list or a lazy source whose undecodable items read as None (the
    data opened once for both)."""
    if section.source == "world":
        return (world.generate(section.n_train, seed=section.seed),
                world.generate(section.n_eval, seed=section.seed + 7919))
    return train_and_held_out(section)


def report_skips(examples: Any, log: Callable[..., None] = print) -> None:
    """Log the examples skipped for undecodable images, if any."""
    skips = getattr(examples, "skips", None)
    if skips:
        log(f"[data] skipped {len(skips)} undecodable image(s): "
            + ", ".join(f"{s['id']} ({s['reason']})" for s in skips.skipped[:10]) + (" ..." if len(skips) > 10 else ""))


def example_inputs(vlm: AdapterVLM, examples: Any, index: int) -> tuple[torch.Tensor, str] | None:
    """One example's preprocessed pixels (1 x C x H x W, on the host) and caption; None for an undecodable image."""
    example = examples[index]
    return None if example is None else (vlm.host_pixel_values([example["image"]]), example["caption"])


def step_inputs(vlm: AdapterVLM, examples: Any, indices: list[int], micro_batch: int,
                decoders: Executor | None = None) -> list[tuple[torch.Tensor, list[str]]]:
    """One step's micro-batches on the host: the preprocessed pixels and the captions of ``examples[indices]``, in
    micro-batches of ``micro_batch`` (undecodable images left out), each image read on one of ``decoders``."""
    load = functools.partial(example_inputs, vlm, examples)
    loaded = list(decoders.map(load, indices)) if decoders is not None else [load(i) for i in indices]
    inputs = []
    for first in range(0, len(loaded), micro_batch):
        chosen = [x for x in loaded[first : first + micro_batch] if x is not None]
        if chosen:
            inputs.append((torch.cat([pixels for pixels, _ in chosen]), [caption for _, caption in chosen]))
    return inputs


def loaded_steps(vlm: AdapterVLM, examples: Any, steps: range, indices_of: Callable[[int], list[int]],
                 micro_batch: int, threads: int) -> Iterator[list[tuple[torch.Tensor, list[str]]]]:
    """Each step's :func:`step_inputs`, the next step's loaded (its images on ``threads`` threads) while the caller
    runs this one."""
    # Examples are read from several threads: datasets' Arrow rows and PIL decoding are safe to read concurrently, and
    # a step's indices are distinct, so no example is read twice at once.
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="train-decode") as decoders:
        yield from prefetched(lambda step: step_inputs(vlm, examples, indices_of(step), micro_batch, decoders), steps,
                              "train-loader")


def blank_like(image: Any) -> Any:
    """A black image of the same size and kind (numpy array or PIL image)."""
    if hasattr(image, "size") and hasattr(image, "mode"):
        from PIL import Image

        return Image.new("RGB", image.size)
    return image * 0


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The global batch of ``step``: epoch-wise permutations, so every example is seen once per epoch."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[k * batch_size : (k + 1) * batch_size].tolist()


# ---- distributed ---------------------------------------------------------------------------------------------
def local_device(local_rank: int | None = None) -> torch.device:
    """This process's device: GPU ``local_rank`` (default ``LOCAL_RANK``, as torchrun sets it), or the one GPU it sees
    where the launcher gave each process its own (Slurm's ``--gpus-per-task``), made current so that the streams, CUDA
    events and NCCL calls that name no device use it rather than GPU 0; the CPU without a GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    device = torch.device("cuda", 0 if torch.cuda.device_count() == 1 else local_rank)
    torch.cuda.set_device(device)
    return device


def dist_info() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world_size) if world_size > 1 else (0, 1)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


# ---- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def caption_loss(vlm: AdapterVLM, examples: list[dict[str, Any]], *, blank: bool = False, batch: int = 64) -> float:
    """Mean next-token loss per caption token on ``examples``; ``blank`` feeds an empty (black) image instead."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        images = [blank_like(r["image"]) if blank else r["image"] for r in chunk]
        b = vlm.build_batch(vlm.pixel_values(images), [r["caption"] for r in chunk], add_eos=True)
        loss, n = vlm.token_losses(b)
        total, count = total + float(loss), count + int(n)
    return total / max(count, 1)


# ---- training ------------------------------------------------------------------------------------------------
def lr_factor(step: int, cfg: TrainSection) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out/checkpoints``."""
    done = sorted((p for p in (out / "checkpoints").glob("step-*") if (p / "state.pt").exists()),
                  key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def save_checkpoint(vlm: AdapterVLM, opt: torch.optim.Optimizer, sched: Any, step: int, out: Path,
                    cfg: TrainConfig, data_commit: str | None = None) -> Path:
    """Adapter files + optimizer/scheduler state (and the config and data commit trained with), written to a
    temporary folder and renamed when complete."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    vlm.save_adapter(tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "config": cfg.to_dict(), "data_commit": data_commit}, tmp / "state.pt")
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.rename(final)
    return final


# Settings that change how training runs, not what it computes: a resume may change them.
RESUME_FREE = {"out", "train.loader_threads", "train.checkpoint_every", "train.eval_every"}


def flat_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` of a config dict (top-level values keep their own name)."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict):
            out.update({f"{name}.{key}": v for key, v in value.items()})
        else:
            out[name] = value
    return out


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings of ``current`` that differ from those a checkpoint was made with (``saved``), but for
    ``RESUME_FREE``; settings a checkpoint predates cannot be compared and are left out."""
    before, now = flat_settings(saved), flat_settings(current)
    return [f"{key}: checkpoint {before[key]!r}, now {now[key]!r}" for key in sorted(now)
            if key in before and key not in RESUME_FREE and before[key] != now[key]]


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          log: Callable[..., None] = print) -> dict[str, Any]:
    """Run the job (``stop_after`` steps at most, as if stopped there); returns the adapter, its hash, the losses."""
    device = local_device()
    rank, world_size = dist_info()
    say = log if rank == 0 else (lambda *_: None)
    torch.manual_seed(cfg.train.seed)
    vlm = build_model(cfg.model, log=say)
    vlm.to(device)
    vlm.train()
    train_set, held_out = load_examples(cfg.data)
    # The hub commit of the examples: a resume after the dataset moved on would train on two versions of it.
    data_commit = train_set.commit if cfg.data.source == "hub" else None
    eval_set = [e for e in held_out if e is not None]
    t = cfg.train
    if t.batch_size % world_size:
        raise ValueError(f"train.batch_size {t.batch_size} must be divisible by the {world_size} processes")
    opt = torch.optim.AdamW(vlm.adapter.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t))
    out = Path(cfg.out)
    start = 0
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        state = torch.load(ckpt / "state.pt", weights_only=False)
        # A resume equals an uninterrupted run of one config; another lr, schedule or dataset would silently mix two.
        recorded = {"data_commit": state["data_commit"]} if state.get("data_commit") else {}
        changed = resume_differences({**state.get("config", {}), **recorded},
                                     {**cfg.to_dict(), "data_commit": data_commit})
        if changed:
            raise ValueError(f"--resume: {ckpt} was made with other settings ({'; '.join(changed)}); resume with the "
                             "config it was made with, or train afresh into another out folder")
        vlm.load_adapter(ckpt)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
        say(f"[train] resumed from {ckpt} at step {start}")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=t.bf16 and device.type == "cuda")
    history = []
    bar = progress(t.steps, "train-adapter", "step", enabled=rank == 0, initial=start)
    clock = time.perf_counter()

    def indices_of(step: int) -> list[int]:
        return batch_indices(len(train_set), t.batch_size, step, t.seed)[rank::world_size]

    # The next step's images are decoded and preprocessed while this step runs on the device.
    steps = range(start, t.steps)
    loaded = loaded_steps(vlm, train_set, steps, indices_of, t.micro_batch, t.loader_threads)
    for step, inputs in zip(counted(steps, bar), loaded):
        batches = [vlm.build_batch(vlm.to_model(pixels), captions, add_eos=True) for pixels, captions in inputs]
        tokens = all_reduce_sum(torch.tensor(float(sum(int((b.labels[:, 1:] != -100).sum()) for b in batches))))
        if float(tokens) == 0:  # every image of this global batch was undecodable (all ranks agree: summed)
            continue
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for b in batches:
            with autocast:
                loss_sum, _ = vlm.token_losses(b)
            (loss_sum / tokens).backward()
            step_loss += loss_sum.item()
        for p in vlm.adapter.parameters():
            all_reduce_sum(p.grad)
        opt.step()
        sched.step()
        loss = float(all_reduce_sum(torch.tensor(step_loss))) / float(tokens)
        history.append(loss)
        rate = (step + 1 - start) * t.batch_size / (time.perf_counter() - clock)
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.0f}")
        done = step + 1
        if rank == 0 and (done % t.checkpoint_every == 0 or done == t.steps):
            save_checkpoint(vlm, opt, sched, done, out, cfg, data_commit)
        if done % t.eval_every == 0 or done == t.steps:
            say(f"[train] step {done}: train loss {loss:.3f}, held-out caption loss {caption_loss(vlm, eval_set):.3f}")
        if stop_after is not None and done >= stop_after:
            if rank == 0:
                save_checkpoint(vlm, opt, sched, done, out, cfg, data_commit)
            return {"steps": done, "stopped": True}
    report_skips(train_set, say)
    result = {"steps": t.steps, "train_loss": history[-1] if history else None,
              "skipped": list(getattr(getattr(train_set, "skips", None), "skipped", []))}
    if rank == 0:
        final = out / "adapter"
        result["adapter_sha256"] = vlm.save_adapter(final)
        result["adapter"] = str(final)
        result["eval_loss"] = caption_loss(vlm, eval_set)
        say(f"[train] adapter saved to {final} (sha256 {result['adapter_sha256'][:12]})")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry (also what ``actstore train-adapter`` runs)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config)
    if args.out:
        cfg.out = args.out
    if args.steps is not None:
        cfg.train.steps = args.steps
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
