"""Prompted against unprompted evaluation, with the prompt's keys and values cached once.

    python eval/bench_prompt_cache.py                     # ~5 minutes on 2 idle CPU cores
    python eval/bench_prompt_cache.py --windows 32 --repeats 3 --mc-docs 32 --threads 1 --out /tmp/smoke.json

On the embedded model (Llama, 4 layers, hidden 256, context 512), in one process:

1. Perplexity: the same windows of the embedded test split scored without a prompt, with a
   prompt of n virtual tokens through the cache (`ctp.lm.window_nlls`, cache build included), and
   with the prompt's embeddings prepended to every window (the path evaluation took before the
   cache, `ctp.lm.token_nlls`), for n in {10, 100} and windows of 32 and 128 tokens. Ratios are
   of median wall times; the target is prompted <= 1.15x unprompted (prepending costs about
   (n + L) / L). The cached and prepended perplexities are checked to agree to 1e-5.
2. lm-eval multiple choice: loglikelihood requests (a short context from the test split, four
   continuations) through `--model ctp` without a prompt, with each prompt (cached), and through
   lm-eval's own `hf` model with `peft=` (prepended), as requests per second.

The variants alternate within each round so machine noise hits all alike; each number is the
median of `--repeats` rounds. Writes the JSON (default eval/results/bench_prompt_cache.json)
and a Markdown table next to it (.md).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctp.artifacts import write_prompt_folder  # noqa: E402
from ctp.data import load_text, tokenize  # noqa: E402
from ctp.lm import spread_windows, token_nlls, window_nlls  # noqa: E402
from ctp.models import load_any, load_tokenizer, resolve_model, tokenizer_fingerprint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


@torch.no_grad()
def prepended_nlls(model: torch.nn.Module, windows: torch.Tensor, prompt: torch.Tensor,
                   batch_size: int) -> torch.Tensor:
    """Mean NLL per window with the prompt's embeddings prepended (evaluation before the cache)."""
    return torch.cat([token_nlls(model, windows[i : i + batch_size], prompt).mean(1).double()
                      for i in range(0, windows.shape[0], batch_size)])


def random_prompt(model: torch.nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` virtual tokens drawn like the model's own embeddings (their std)."""
    weight = model.get_input_embeddings().weight.float()
    return torch.randn(n, weight.shape[1], generator=torch.Generator().manual_seed(seed)) * weight.std()


def bench_perplexity(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    rows = []
    for seqlen in args.seqlens:
        windows = spread_windows(ids, seqlen, args.windows)
        for n in args.virtual_tokens:
            prompt = random_prompt(model, n)
            variants = {
                "unprompted": partial(window_nlls, model, windows, None, args.batch_size),
                "cached": partial(window_nlls, model, windows, prompt, args.batch_size),
                "prepended": partial(prepended_nlls, model, windows, prompt, args.batch_size),
            }
            times: dict[str, list[float]] = {k: [] for k in variants}
            values: dict[str, torch.Tensor] = {}
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    seconds, values[name] = timed(fn)
                    times[name].append(seconds)
            median = {k: statistics.median(v) for k, v in times.items()}
            ppl = {k: math.exp(v.mean().item()) for k, v in values.items()}
            rows.append({
                "n": n, "seqlen": seqlen, "windows": windows.shape[0], "batch_size": args.batch_size,
                "seconds": median, "cached_ratio": median["cached"] / median["unprompted"],
                "prepended_ratio": median["prepended"] / median["unprompted"],
                "ppl": ppl, "cached_vs_prepended_rel": abs(ppl["cached"] / ppl["prepended"] - 1),
            })
            print(f"ppl  n={n:3d} L={seqlen:3d}: cached {rows[-1]['cached_ratio']:.3f}x, "
                  f"prepended {rows[-1]['prepended_ratio']:.3f}x unprompted", flush=True)
    return rows


def mc_requests(tokenizer: Any, ids: torch.Tensor, docs: int, context: int, choice: int) -> list:
    """``docs`` multiple-choice questions from the token stream: a context of ``context`` tokens
    and four continuations of ``choice`` tokens (the true one and three from elsewhere)."""
    from lm_eval.api.instance import Instance

    stride = context + choice
    requests = []
    for d in range(docs):
        start = d * stride
        ctx = tokenizer.decode(ids[start : start + context])
        for k in range(4):
            at = start + context + k * 7 * stride
            requests.append(Instance("loglikelihood", {}, (ctx, tokenizer.decode(ids[at : at + choice])), k))
    return requests


def bench_lm_eval(folder: str, ids: torch.Tensor, tokenizer: Any, model: torch.nn.Module,
                  args: argparse.Namespace, work: Path) -> list[dict]:
    from lm_eval.models.huggingface import HFLM

    from ctp.evaluation.lm_eval_plugin import CTPLM

    need = (args.mc_docs + 22) * (args.mc_context + args.mc_choice)  # 3 distractors, 7 strides apart
    requests = mc_requests(tokenizer, ids[:need], args.mc_docs, args.mc_context, args.mc_choice)
    models: dict[str, Any] = {"unprompted": CTPLM(pretrained=folder, device=args.device,
                                                  batch_size=args.batch_size)}
    for n in args.virtual_tokens:
        prompt_dir = work / f"prompt-{n}"
        prompt_dir.mkdir()
        meta = {"num_virtual_tokens": n, "hidden_size": model.config.hidden_size, "base_fingerprint": None,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "prompt_config": {},
                "best_val_ppl": 1.0}
        write_prompt_folder(prompt_dir, random_prompt(model, n), folder, model.config.num_hidden_layers,
                            model.config.num_attention_heads, meta)
        models[f"cached n={n}"] = CTPLM(pretrained=folder, prompt=str(prompt_dir), device=args.device,
                                        batch_size=args.batch_size)
        models[f"hf+peft n={n}"] = HFLM(pretrained=folder, peft=str(prompt_dir), device=args.device,
                                        dtype="float32", batch_size=args.batch_size)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for name, lm in models.items():
            times[name].append(timed(partial(lm.loglikelihood, requests, disable_tqdm=True))[0])
    base = statistics.median(times["unprompted"])
    rows = []
    for name, series in times.items():
        seconds = statistics.median(series)
        rows.append({"model": name, "requests": len(requests), "seconds": seconds,
                     "requests_per_second": len(requests) / seconds, "ratio": seconds / base})
        print(f"mc   {name:14s}: {rows[-1]['requests_per_second']:.1f} requests/s ({rows[-1]['ratio']:.3f}x)",
              flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["| n | window L | unprompted s | cached s | prepended s | cached / unprompted | "
             "prepended / unprompted |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["perplexity"]:
        s = r["seconds"]
        lines.append(f"| {r['n']} | {r['seqlen']} | {s['unprompted']:.3f} | {s['cached']:.3f} | "
                     f"{s['prepended']:.3f} | {r['cached_ratio']:.2f}x | {r['prepended_ratio']:.2f}x |")
    if result.get("lm_eval"):
        lines += ["", "| lm-eval multiple choice | requests/s | time vs unprompted |", "|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['requests_per_second']:.1f} | {r['ratio']:.2f}x |"
                  for r in result["lm_eval"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--virtual-tokens", type=int, nargs="+", default=[10, 100])
    p.add_argument("--seqlens", type=int, nargs="+", default=[32, 128])
    p.add_argument("--windows", type=int, default=128, help="windows scored per measurement")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mc-docs", type=int, default=200, help="multiple-choice questions (0: skip lm-eval)")
    p.add_argument("--mc-context", type=int, default=24, help="context tokens per question")
    p.add_argument("--mc-choice", type=int, default=4, help="tokens per answer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(REPO / "eval" / "results" / "bench_prompt_cache.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = resolve_model("embedded")
    model, tokenizer = load_any(folder, device=args.device), load_tokenizer(folder)
    ids = tokenize(tokenizer, load_text("embedded", "test"))
    result: dict[str, Any] = {
        "model": "embedded", "device": args.device, "threads": args.threads, "torch": torch.__version__,
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "perplexity": bench_perplexity(model, ids, args),
    }
    if args.mc_docs:
        with tempfile.TemporaryDirectory(prefix="bench-prompt-cache-") as work:
            result["lm_eval"] = bench_lm_eval(folder, ids, tokenizer, model, args, Path(work))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    print(f"-> {out}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
