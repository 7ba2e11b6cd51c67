"""The ``actstore`` command line: store inspection (info, verify, report, latent) and the jobs (train-adapter, harvest,
analyze, demo). A job's options are its own: ``actstore harvest ...`` hands everything after ``harvest`` to
``jobs.harvest.main``, the same entry that ``torchrun -m jobs.harvest`` runs."""

# It lives in ``jobs`` because it starts jobs: ``actstore`` (the library) imports nothing of ``jobs``.

from __future__ import annotations

import argparse
import importlib
import json
import sys

from actstore.errors import StoreError

# subcommand -> (module whose main(argv) runs it, help)
JOBS = {
    "train-adapter": ("jobs.train_adapter",
                      "train the linear adapter of a VLM (torchrun -m jobs.train_adapter for DDP)"),
    "harvest": ("jobs.harvest", "harvest residual streams into a store (torchrun -m jobs.harvest for many GPUs)"),
    "analyze": ("jobs.analyze", "per-layer SAE statistics of a store (Dask; --scheduler for a cluster)"),
}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    """Print a store's schema, sizes, completeness and integrity verdict."""
    from actstore.integrity import store_info

    info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    s = info["schema"]
    print(f"store        {info['location']}")
    print(f"created      {info['created']} by actstore {info['actstore_version']}")
    print(f"layers       {len(s['layers'])} residual states {s['layers'][0]}..{s['layers'][-1]}")
    print(f"shape        image_tokens={s['image_tokens']} d_model={s['d_model']} dtype={s['dtype']}")
    print(
        f"chunking     {s['block_images']} images per block"
        + (f" (shards of {s['chunk_images']}-image chunks)" if s["chunk_images"] else "")
        + f", codec {s['codec']} level {s['clevel']} + crc32c"
    )
    print(f"complete     {info['blocks_complete']} / {info['blocks_total']} blocks, {info['images']} images, "
          f"{info['text_tokens']} text tokens")
    print(f"size         {_human(info['bytes_logical'])} logical, {_human(info['bytes_stored'])} stored "
          f"(ratio {info['compression_ratio']:.2f})")
    for key, value in info["provenance"].items():
        print(f"provenance   {key}: {value}")
    if info["skipped_images"]:
        shown = ", ".join(f"{x['id']} ({x['reason']})" for x in info["skipped_images"][:5])
        print(f"skipped      {len(info['skipped_images'])} input image(s): {shown}")
    for analysis in info["analyses"]:
        layers = analysis["layers"]
        span = f"states {layers[0]}..{layers[-1]} ({len(layers)})" if layers else "no layers"
        state = f"computed {analysis['computed']}" if analysis["complete"] else "INCOMPLETE (stopped while saving)"
        print(f"analysis     {analysis['name']}: {span}, {state}")
    print(f"integrity    {info['verdict']}")
    return 0 if not info["verdict"].startswith("DAMAGED") else 1


def cmd_verify(args: argparse.Namespace) -> int:
    """Decode every chunk of a store and report damage by layer and image range."""
    from actstore.integrity import damaged_blocks, verify, withdraw_markers

    report = verify(args.store, threads=args.threads, progress=True)
    for problem in report.problems:
        print(problem)
    verdict = "OK" if report.ok else f"FAILED: {len(report.problems)} damaged chunk(s)"
    print(f"{verdict} ({report.chunks_checked} chunks checked)")
    blocks = damaged_blocks(report)
    if blocks and args.repair:
        withdrawn = withdraw_markers(args.store, blocks)
        print(f"repair: blocks {withdrawn} are marked missing now (readers leave them out); rerun the harvest command "
              "that wrote this store to write them again")
    elif blocks:
        print(f"`actstore verify {args.store} --repair` marks blocks {blocks} missing, so that rerunning the harvest "
              "writes them again")
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the embedded end-to-end demo."""
    from jobs.demo import run_demo

    run_demo(out=args.out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report of an analysed store."""
    from actstore.report import write_report

    out = write_report(args.store, args.out, suite=args.suite, suite_path=args.saes, n_images=args.images,
                       layer=args.state, latent=args.latent, data_path=args.data)
    print(f"report: {out / 'report.html'} and {out / 'report.md'}")
    return 0


def cmd_latent(args: argparse.Namespace) -> int:
    """Print one latent of an analysed store: its description, firing and the tokens where it is most active."""
    import pandas as pd

    import actstore
    from actstore.examples import check_state_and_latent, top_examples
    from actstore.report import choose_analysis, store_decoder
    from actstore.stats import open_stats

    suite = choose_analysis(args.store, args.suite)
    stats = open_stats(args.store, suite)
    check_state_and_latent(stats, args.state, args.latent)
    ds = actstore.open(args.store)
    where = stats.sel(layer=args.state, latent=args.latent)
    description = str(where.description.values) if "description" in stats else ""
    print(f"latent {args.latent} at state {args.state} ({suite}): {description or '(no description)'}")
    for kind in (str(k) for k in stats.kind.values):
        on = where.sel(kind=kind)
        print(f"  {kind} tokens: fires on {float(on.fire_freq):.4g} of them, mean activation {float(on.act_mean):.4g} "
              f"where it fires, max {float(on.act_max):.4g}")
    decode, note = store_decoder(ds) if args.kind == "text" else (None, "")
    table = top_examples(stats, ds, args.state, args.latent, args.kind, decode)
    print(f"strongest on {args.kind} tokens" + (f" ({note})" if note else "") + ":")
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        print(table.to_string(index=False) if len(table) else f"  none: it never fires on {args.kind} tokens")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="actstore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="schema, sizes, completeness and integrity verdict of a store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("verify", help="decode every chunk and report checksum failures")
    p.add_argument("store")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--repair", action="store_true",
                   help="mark completed blocks with a damaged chunk missing, for the harvest's rerun to write again")
    p.set_defaults(func=cmd_verify)
    for name, (_, help_text) in JOBS.items():  # options are parsed by the job itself
        sub.add_parser(name, help=help_text + "; see `actstore " + name + " --help`", add_help=False)
    p = sub.add_parser("report", help="report.md / report.html / PNG figures of an analysed store")
    p.add_argument("store")
    p.add_argument("--out", default=None, help="folder (default: report-<suite> beside the store, or here for a URL)")
    p.add_argument("--suite", default=None, help="which analysis, if the store has several")
    p.add_argument("--saes", default=None, help="the suite YAML, if it moved since the analysis (heat maps)")
    p.add_argument("--state", type=int, default=None,
                   help="heat maps at this residual state (default: the one whose alignment gains most over random)")
    p.add_argument("--latent", type=int, default=None,
                   help="heat maps of this latent of --state's SAE (default: its strongest selective image latent)")
    p.add_argument("--images", type=int, default=4, help="how many images the heat maps show: those where the "
                   "latent is most active, at most the analysis' top-k examples per latent (8 by default)")
    p.add_argument("--data", default=None, help="where the harvested dataset is now, if it moved since the harvest "
                   "(the heat maps' pictures)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("latent", help="one latent of an analysed store: description, firing, top examples")
    p.add_argument("store")
    p.add_argument("--state", type=int, required=True, help="the residual state whose SAE it belongs to")
    p.add_argument("--latent", type=int, required=True)
    p.add_argument("--kind", choices=("image", "text"), default="image", help="which tokens' top examples to list")
    p.add_argument("--suite", default=None, help="which analysis, if the store has several")
    p.set_defaults(func=cmd_latent)
    p = sub.add_parser("demo", help="run the embedded demo on a CPU")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``actstore`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in JOBS:
            importlib.import_module(JOBS[argv[0]][0]).main(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except (StoreError, ValueError, FileNotFoundError) as exc:  # bad input: its message names it; no traceback
        print(f"actstore: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
