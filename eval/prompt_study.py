"""What moves a soft prompt's recovery on the embedded model? (the README's study and tables)

    python eval/prompt_study.py --part study      # variants on wanda-50%+nf4   (~35 min, 2 cores)
    python eval/prompt_study.py --part recovery   # best prompt per compressed model (~12 min)

Every run trains on the embedded train split, keeps the checkpoint with the best validation
perplexity (validation split), and is scored on the **test** split, windows of 256 tokens, with
the virtual positions never scored and the same targets as without a prompt. Recovery is the
share of the log-perplexity gap won back:
(log ppl_compressed - log ppl_prompted) / (log ppl_compressed - log ppl_dense).

Input prompts go through ctp.tune_prompt. For comparison, a deep prompt (PEFT prefix tuning:
per-layer key/value prefixes) and LoRA (rank 8 on every decoder Linear) are trained by a plain
loop here with the same data order, steps, schedule and honest loss, on the same 4-bit model.
Results are appended to eval/results/prompt_study.jsonl (finished runs are skipped when the
script is run again) and summarised in eval/results/prompt_study.md.
"""

from __future__ import annotations

import argparse
import json
import os
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctp.compression.pipeline import compress  # noqa: E402
from ctp.config import CompressConfig, PromptConfig  # noqa: E402
from ctp.data import load_text, tokenize  # noqa: E402
from ctp.demo import EMBEDDED_CALIB, slug  # noqa: E402
from ctp.evaluation.transfer import gap_recovered  # noqa: E402
from ctp.evaluation.perplexity import perplexity_of_ids  # noqa: E402
from ctp.lm import context_cache, spread_windows, token_nlls, window_nlls, windows_of  # noqa: E402
from ctp.models import load_any, load_tokenizer, resolve_model  # noqa: E402
from ctp.prompt.state import lr_factor  # noqa: E402
from ctp.prompt.tune import tune_prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "eval" / "results"
SEQLEN = 256
STEPS = 400
BATCH = 8

TARGETS = {
    "wanda-50%+nf4": CompressConfig(prune="wanda", sparsity=0.5, quant="nf4", rounding="rtn", **EMBEDDED_CALIB),
    "magnitude-50%+nf4": CompressConfig(prune="magnitude", sparsity=0.5, quant="nf4", **EMBEDDED_CALIB),
    "wanda-2:4+nf4": CompressConfig(prune="wanda", pattern="2:4", quant="nf4", rounding="rtn", **EMBEDDED_CALIB),
    "nf4": CompressConfig(prune="none", quant="nf4", **EMBEDDED_CALIB),
    "sparsegpt-50%+nf4-obs": CompressConfig(prune="sparsegpt", sparsity=0.5, quant="nf4", rounding="obs",
                                            **EMBEDDED_CALIB),
    "dense": None,  # the same prompt recipe on the uncompressed model: what is plain adaptation?
}


def prompt_config(**overrides) -> PromptConfig:
    base = dict(prompt_type="input", objective="nll", num_virtual_tokens=50, init="vocab", data="embedded", steps=STEPS, lr=1e-2,
                warmup_steps=40, schedule="linear", seqlen=SEQLEN, batch_size=BATCH,
                eval_every=50, eval_windows=64, save_every=10_000, seed=0, device="cpu")
    base.update(overrides)
    return PromptConfig(**base)


STUDY = {  # name -> (method, settings); all on wanda-50%+nf4
    "prompt n=50 lr=1e-2 (reference)": ("prompt", dict()),
    "prompt n=10 lr=1e-2": ("prompt", dict(num_virtual_tokens=10)),
    "prompt n=100 lr=1e-2": ("prompt", dict(num_virtual_tokens=100)),
    "prompt n=50 lr=3e-3": ("prompt", dict(lr=3e-3)),
    "prompt n=50 lr=3e-2": ("prompt", dict(lr=3e-2)),
    "prompt n=50 lr=1e-2 cosine": ("prompt", dict(schedule="cosine")),
    "prompt n=50 init=sample-vocab": ("prompt", dict(init="sample-vocab")),
    "prompt n=50 init=text": ("prompt", dict(init="text:Returns the tensor. Args: input (Tensor): the input tensor.")),
    "prompt n=50 1200 steps": ("prompt", dict(steps=1200)),
    "prompt n=20 lr=1e-2": ("prompt", dict(num_virtual_tokens=20)),
    "prefix n=50 lr=1e-2 (deep prompt)": ("prefix", dict(num_virtual_tokens=50, lr=1e-2)),
    "LoRA r=8 lr=1e-3": ("lora", dict(lr=1e-3)),
}


class Data:
    def __init__(self, tokenizer) -> None:
        self.train = tokenize(tokenizer, load_text("embedded", "train"))
        self.val = tokenize(tokenizer, load_text("embedded", "validation"))
        self.test = tokenize(tokenizer, load_text("embedded", "test"))


def model_dir(label: str, workdir: Path) -> Path:
    config = TARGETS[label]
    if config is None:
        return Path(resolve_model("embedded"))
    folder = workdir / slug(config)
    if not (folder / "ctp_compression.json").exists():
        compress("embedded", config, folder, overwrite=True, progress=False)
    return folder


def test_ppl(model, data: Data, prompt=None) -> float:
    return perplexity_of_ids(model, data.test, SEQLEN, prompt=prompt, batch_size=8).ppl


def run_prompt(folder: Path, data: Data, settings: dict) -> dict:
    config = prompt_config(**settings)
    model = load_any(str(folder))
    started = time.time()
    result = tune_prompt(model, config, tokenizer=load_tokenizer(str(folder)), train_ids=data.train,
                         val_ids=data.val, progress=False)
    seconds = time.time() - started
    return {"ppl": test_ppl(model, data, result.prompt), "params": result.prompt.numel(),
            "seconds_per_step": result.meta["train_seconds_this_run"] / config.steps,
            "best_step": result.meta["best_step"], "best_val_ppl": result.meta["best_val_ppl"],
            "seconds": round(seconds, 1)}


def run_peft(folder: Path, data: Data, method: str, settings: dict) -> dict:
    """Prefix tuning or LoRA with PEFT, the same data order / schedule / honest loss as ctp."""
    config = prompt_config(**settings)
    model, meta = train_adapter(folder, data.train, data.val, method, config, SEQLEN, BATCH)
    return {"ppl": test_ppl(model, data), **meta}


def train_adapter(folder: Path, train: torch.Tensor, val: torch.Tensor, method: str,
                  config: PromptConfig, seqlen: int, batch: int, lr: float | None = None,
                  bos: int | None = None):
    """Train a PEFT prefix ("prefix") or LoRA r=8 (alpha 16) on every decoder Linear ("lora") on
    the frozen model in ``folder``: ``config``'s steps, lr (or ``lr``), schedule, warmup, clip and
    seed, windows of ``seqlen`` in a seeded order, ``batch`` per step, the honest loss
    (ctp.lm.token_nlls: the real tokens' next-token NLL, after BOS when ``bos`` is an id -- its
    keys and values recomputed each step, with gradients, since the adapter changes them); keeps
    the weights with the best validation perplexity (step 0 included). Returns (peft model,
    metadata)."""
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    model = load_any(str(folder))
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "prefix":
        peft_config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens)
    else:
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and name != "lm_head"})
        peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0,
                                 target_modules=targets)
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, peft_config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr or config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, config.steps, config.warmup_steps))
    chunks = windows_of(train, seqlen)
    val_windows = spread_windows(val, seqlen, config.eval_windows)
    order = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(config.seed * 1_000_003))

    def validate() -> float:
        peft_model.eval()
        with torch.no_grad():
            return math.exp(window_nlls(peft_model, val_windows, context_cache(peft_model, None, bos), 8).mean().item())

    best, best_step, best_state, train_time = validate(), 0, [p.detach().clone() for p in params], 0.0
    for step in range(config.steps):
        started = time.time()
        peft_model.train()
        ids = chunks[order[(step * batch) % len(order):][:batch]]
        loss = token_nlls(peft_model, ids, context_cache(peft_model, None, bos)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.time() - started
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            ppl = validate()
            if ppl < best:
                best, best_step, best_state = ppl, step + 1, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, saved in zip(params, best_state):
            p.copy_(saved)
    peft_model.eval()
    return peft_model, {"params": sum(p.numel() for p in params), "steps": config.steps, "best_step": best_step,
                        "seconds_per_step": train_time / max(1, config.steps), "best_val_ppl": best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["study", "recovery"], required=True)
    p.add_argument("--workdir", default="/tmp/ctp-eval-compression/models")
    p.add_argument("--only", nargs="*", help="run only these study names")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 1 when sharing the machine
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_path = RESULTS / "prompt_study.jsonl"
    done = {}
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["part"], row["name"])] = row
    workdir = Path(args.workdir)
    tokenizer = load_tokenizer("embedded")
    data = Data(tokenizer)

    def baseline(key: str, folder: str) -> float:
        if ("baseline", key) not in done:
            row = {"part": "baseline", "name": key, "ppl": test_ppl(load_any(folder), data)}
            done[("baseline", key)] = row
            with log_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        return done[("baseline", key)]["ppl"]

    dense = baseline("dense", "embedded")
    if args.part == "study":
        jobs = [(name, "wanda-50%+nf4", method, settings) for name, (method, settings) in STUDY.items()
                if not args.only or name in args.only]
    else:
        best = json.loads((RESULTS / "prompt_best.json").read_text()) if (RESULTS / "prompt_best.json").exists() \
            else {"method": "prompt", "settings": {}}
        jobs = [(f"{best['method']} on {label}", label, best["method"], best["settings"])
                for label in TARGETS]
    for name, label, method, settings in jobs:
        if (args.part, name) in done:
            continue
        folder = model_dir(label, workdir)
        compressed = baseline(label, str(folder)) if label != "dense" else dense
        started = time.time()
        run = run_prompt(folder, data, settings) if method == "prompt" else run_peft(folder, data, method, settings)
        row = {"part": args.part, "name": name, "target": label, "method": method, "settings": settings,
               "dense_ppl": dense, "compressed_ppl": compressed, **run,
               "recovery": gap_recovered(dense, compressed, run["ppl"]), "wall_seconds": round(time.time() - started, 1)}
        print(json.dumps(row), flush=True)
        done[(args.part, name)] = row
        with log_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    write_summary(done)


def write_summary(done: dict) -> None:
    lines = []
    for part, title in (("study", "Study on wanda-50%+nf4"), ("recovery", "Recovery per compressed model")):
        rows = [r for (p, _), r in done.items() if p == part]
        if not rows:
            continue
        lines += [f"### {title} (test split, seqlen {SEQLEN})", "",
                  "| run | target | trainable params | s/step | ppl dense | ppl compressed | ppl with it | recovered |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['name']} | {r['target']} | {r['params']:,} | {r['seconds_per_step']:.3f} | "
                         f"{r['dense_ppl']:.3f} | {r['compressed_ppl']:.3f} | {r['ppl']:.3f} | "
                         + (f"{r['recovery'] * 100:.1f}% |" if r["recovery"] is not None
                            else f"(dense: {(r['ppl'] / r['dense_ppl'] - 1) * 100:+.1f}% ppl) |"))
        lines.append("")
    (RESULTS / "prompt_study.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
