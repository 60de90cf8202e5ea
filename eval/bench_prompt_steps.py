"""What a prompt-training step costs: time and peak memory of every kind and objective, against
the unchunked next-token step ctp took before its losses went through the head in chunks.

    python eval/bench_prompt_steps.py --model gemma3-270m --target DIR   # a compressed copy
    python eval/bench_prompt_steps.py --model smollm2-135m --target DIR

Variants, all on the same batch (``--batch-size`` windows of ``--seqlen`` tokens of the embedded
train split, ``--tokens`` virtual tokens, BOS by the rule):

- ``whole``: the step before this change -- the prompt's embeddings prepended, the model's whole
  ``[batch, seq, vocab]`` logits, cross-entropy, backward (written out here as it was);
- ``nll-input``: ctp's step now (``Objective("nll")``: the prompt through its cache, the head in
  chunks);
- ``kd-input``: distillation from the dense base (``--model``), the teacher run on the same windows;
- ``nll-kv``, ``kd-kv``: the same with a key/value prompt;
- any of these with ``+ckpt`` (e.g. ``nll-input+ckpt``): under ``--gradient-checkpointing``
  (each decoder layer recomputed in the backward pass instead of its activations stored);
- ``kd-input+cache``, ``kd-kv+cache``: distillation with a warm ``--teacher-cache`` (the warm-up
  round writes the teacher's hidden states of the batch; the timed rounds read them and run only
  the teacher's output head).

Time: every variant runs ``--steps`` steps after one warm-up, interleaved round-robin in ONE
process, and the median step is reported, with ratios against ``whole`` and ``nll-input``
(machines are noisy; ratios measured side by side are what compare). Memory: each variant runs
again alone in a fresh process and reports its peak RSS (``ru_maxrss``), and ``ctp eval
--batch-size B --seqlen L`` on the target is measured the same way. Writes
``eval/results/bench_prompt_steps-<model>.json`` and ``.md``. Run it alone: a second torch job on
2 cores distorts every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("whole", "nll-input", "kd-input", "nll-kv", "kd-kv", "nll-input+ckpt", "kd-kv+ckpt")


def _setup(args):
    import torch

    from ctp.data import load_text, tokenize
    from ctp.lm import bos_token, windows_of
    from ctp.models import load_any, load_tokenizer

    torch.manual_seed(0)
    model = load_any(args.target, device="cpu")
    tokenizer = load_tokenizer(args.target)
    for p in model.parameters():
        p.requires_grad_(False)
    bos = bos_token("auto", model.config, tokenizer)
    text = load_text("embedded", "train", max_documents=400)
    batch = windows_of(tokenize(tokenizer, text, bos), args.seqlen, args.batch_size)
    return model, tokenizer, bos, batch


def _step_functions(args, model, tokenizer, bos, batch, variants):
    """``{variant: step()}``: each step computes the loss, backpropagates to its prompt, zeroes it."""
    import torch
    import torch.nn.functional as F

    from ctp.config import PromptConfig
    from ctp.models import checkpoint_layers, load_any
    from ctp.prompt.kinds import context_of, initial_prompt
    from ctp.prompt.objective import Objective, Teacher, TeacherCache
    from ctp.prompt.state import init_prompt

    embed = model.get_input_embeddings()
    start = init_prompt(PromptConfig(num_virtual_tokens=args.tokens, init="vocab"), embed.weight, tokenizer)
    teacher = None
    if any(v.startswith("kd") for v in variants):
        dense = load_any(args.model, device="cpu")
        for p in dense.parameters():
            p.requires_grad_(False)
        teacher = Teacher(dense, context_of(dense, None, bos), args.model)
    steps = {}
    for variant in variants:
        if variant == "whole":
            prompt = torch.nn.Parameter(start.clone())

            def whole(prompt=prompt):
                tok = embed(batch)
                parts = [] if bos is None else [embed(torch.full((batch.shape[0], 1), bos))]
                full = torch.cat([*parts, prompt.unsqueeze(0).expand(batch.shape[0], -1, -1), tok], dim=1)
                logits = model(inputs_embeds=full, use_cache=False).logits[:, full.shape[1] - batch.shape[1]:]
                loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       batch[:, 1:].reshape(-1))
                loss.backward()
                prompt.grad = None

            steps[variant] = whole
            continue
        base, _, flag = variant.partition("+")
        objective_name, kind = base.split("-")
        soft = initial_prompt(kind, start, model, model, bos)
        param = torch.nn.Parameter(soft.tensor.clone())
        taught = teacher
        if flag == "cache":  # the warm-up round writes the teacher's hidden states, timed rounds read them
            taught = Teacher(teacher.model, teacher.context, teacher.name,
                             TeacherCache(tempfile.mkdtemp(prefix="ctp-bench-teacher-"), teacher.model, bos))
        objective = Objective(objective_name, 0.5, taught if objective_name == "kd" else None)

        def step(param=param, soft=soft, objective=objective, ckpt=flag == "ckpt"):
            with checkpoint_layers(model) if ckpt else contextlib.nullcontext():
                loss = objective.loss(model, batch, soft.with_tensor(param).cache(model, bos))
                loss.backward()
            param.grad = None

        steps[variant] = step
    return steps


def child(args) -> None:
    """One process: time every variant side by side (``--variants`` all) or one alone (memory)."""
    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer, bos, batch = _setup(args)
    variants = args.variants.split(",")
    steps = _step_functions(args, model, tokenizer, bos, batch, variants)
    times = {v: [] for v in variants}
    for round_ in range(args.steps + 1):
        for variant in variants:
            started = time.perf_counter()
            steps[variant]()
            if round_:  # the first round warms up
                times[variant].append(time.perf_counter() - started)
    print(json.dumps({"seconds": {v: statistics.median(t) for v, t in times.items()},
                      "all_seconds": times,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _nll_of(variant: str) -> str:
    """The next-token variant a distillation variant compares with: same kind, same checkpointing
    (a teacher cache has no next-token counterpart: it compares with the plain step)."""
    return "nll" + variant[2:].removesuffix("+cache")


def _run(argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _eval_rss(args) -> dict:
    code = ("import json, resource, sys; from ctp.cli import main; "
            f"code = main(['eval', {args.target!r}, '--ppl', 'embedded', '--batch-size', '{args.batch_size}', "
            f"'--seqlen', '{args.seqlen}', '--max-windows', '{args.eval_windows}', '--device', 'cpu', "
            "'--no-progress', '--json']); "
            "print(json.dumps({'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    lines = proc.stdout.strip().splitlines()
    return {"ppl": json.loads(lines[-2])["ppl"]["embedded"], **json.loads(lines[-1])}


def _load_rss(args) -> dict:
    code = ("import json, resource; from ctp.models import load_any; m = load_any(%r, device='cpu'); "
            "print(json.dumps({'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))"
            % args.target)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the dense base (teacher), e.g. gemma3-270m")
    p.add_argument("--target", required=True, help="a compressed copy of it (ctp compress)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--tokens", type=int, default=10, help="virtual tokens")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help="results path without suffix (default eval/results/bench_prompt_steps-MODEL)")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    common = ["--model", args.model, "--target", args.target, "--batch-size", str(args.batch_size),
              "--seqlen", str(args.seqlen), "--tokens", str(args.tokens), "--threads", str(args.threads),
              "--child"]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS and not (v.endswith("+ckpt") and v[:-5] in VARIANTS[1:5])
               and not (v.endswith("+cache") and v[:-6] in ("kd-input", "kd-kv"))]
    if unknown:
        p.error(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS[:5])}, each but whole "
                "optionally with +ckpt, a kd variant with +cache")
    timing = _run([*common, "--variants", args.variants, "--steps", str(args.steps)])
    memory = {v: _run([*common, "--variants", v, "--steps", "1"])["peak_rss_bytes"] for v in variants}
    secs = timing["seconds"]
    result = {
        "model": args.model, "target": args.target,
        "batch": f"{args.batch_size} x {args.seqlen} tokens, {args.tokens} virtual tokens",
        "threads": args.threads, "timed_steps": args.steps,
        "step_seconds": secs,
        "step_ratio_vs_whole": {v: secs[v] / secs["whole"] for v in variants if "whole" in secs},
        "step_ratio_vs_nll_input": {v: secs[v] / secs["nll-input"] for v in variants if "nll-input" in secs},
        # a distillation step against the next-token step of the same kind (and checkpointing)
        "step_ratio_kd_vs_nll_same_kind": {v: secs[v] / secs[_nll_of(v)] for v in variants
                                           if v.startswith("kd") and _nll_of(v) in secs},
        "peak_rss_bytes": memory,
        "load_only_peak_rss_bytes": _load_rss(args)["peak_rss_bytes"],
        "eval": {"batch_size": args.batch_size, "seqlen": args.seqlen, "windows": args.eval_windows,
                 **_eval_rss(args)},
        "all_step_seconds": timing["all_seconds"],
    }
    out = Path(args.out or REPO / "eval" / "results" / f"bench_prompt_steps-{Path(args.model).name}")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    gb = 2 ** 30
    lines = [f"Prompt-training step on `{args.target}` (teacher `{args.model}`), {result['batch']}, "
             f"{args.threads} threads, median of {args.steps} steps interleaved in one process; peak RSS "
             "of each variant alone in a fresh process.", "",
             "| variant | step (s) | vs whole logits | vs nll-input | kd vs nll, same kind | peak RSS (GB) |",
             "|---|---:|---:|---:|---:|---:|"]
    same = result["step_ratio_kd_vs_nll_same_kind"]
    for v in variants:
        ratios = [result["step_ratio_vs_whole"].get(v), result["step_ratio_vs_nll_input"].get(v), same.get(v)]
        lines.append(f"| {v} | {secs[v]:.2f} | " + " | ".join("" if r is None else f"{r:.3f}" for r in ratios)
                     + f" | {memory[v] / gb:.2f} |")
    lines += ["", f"Loading the target alone: {result['load_only_peak_rss_bytes'] / gb:.2f} GB; `ctp eval "
              f"--batch-size {args.batch_size} --seqlen {args.seqlen}` ({args.eval_windows} windows): "
              f"{result['eval']['peak_rss_bytes'] / gb:.2f} GB."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
