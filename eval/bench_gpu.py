"""ctp at 7B scale on one GPU: compression time and memory, prompt-training throughput, perplexity
throughput -- on a Llama-2-7B-shaped model with random weights (no download needed).

    python eval/bench_gpu.py                         # one 80 GB H100: about 6 minutes
    python eval/bench_gpu.py --layers 4              # a shorter run (same shapes, fewer layers)
    python eval/bench_gpu.py --device cpu --layers 2 --hidden 256 --intermediate 688 \\
        --heads 4 --vocab 2048 --nsamples 4 --seqlen 128 --train-seqlen 96 --virtual-tokens 8
                                                     # a CPU smoke run of every step

Steps, all in this process except the compression (its own process, so its peak host RSS is
its own):
1. build the model (hidden 4096, 32 layers, intermediate 11008, vocab 32000, 32 heads), random
   weights stored in fp16 like a real checkpoint;
2. `ctp compress` Wanda 50% + NF4 with 128 x 2048 calibration tokens from the embedded corpus:
   wall time, peak GPU memory, peak host RSS (targets: < 3 minutes, < 8 GB GPU);
3. 20 tune-prompt steps (100 virtual tokens, 2 x 1024-token windows, bf16) with and without
   gradient checkpointing, and 20 steps of a bare PEFT prompt-tuning loop on the same 4-bit
   model: training tokens/s and peak GPU memory (target: ctp >= 0.9x the bare loop);
4. perplexity throughput with and without a prompt on the same windows.
Writes eval/results/bench_gpu.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (a smoke run)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length (= context)")
    p.add_argument("--steps", type=int, default=20, help="prompt-training steps per run")
    p.add_argument("--virtual-tokens", type=int, default=100)
    p.add_argument("--train-seqlen", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--workdir", help="where the models go (default: a temporary folder)")
    p.add_argument("--out", default=str(REPO / "eval" / "results" / "bench_gpu.json"))
    return p.parse_args()


def build_model(folder: Path, args: argparse.Namespace, device: str) -> int:
    """Random weights, initialised on ``device`` (fast on a GPU), saved in fp16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seqlen,
                         dtype="float16")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(REPO / "ctp" / "assets" / "embedded-llama").save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return params


def compress_step(dense: Path, out: Path, args: argparse.Namespace) -> dict:
    """`ctp compress` in a fresh process: its report has time, peak GPU memory and host RSS."""
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "ctp.cli", "compress", str(dense), "--out", str(out), "--prune", "wanda",
         "--sparsity", "0.5", "--quant", "nf4", "--calib", "embedded", "--nsamples", str(args.nsamples),
         "--seqlen", str(args.seqlen), "--device", args.device, "--json", "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    report = json.loads(proc.stdout)
    mem = report["peak_memory"]
    return {"wall_seconds": round(time.time() - started, 1), "internal_seconds": report["seconds"],
            "layers_seconds": report["prune_seconds"],
            "gpu_peak_gib": round(mem.get("gpu_peak_allocated_bytes", 0) / 2**30, 2),
            "host_peak_rss_gib": round(mem["cpu_peak_rss_bytes"] / 2**30, 2),
            "bits_per_weight": round(report["bits_per_weight"], 3),
            "sparsity": report["sparsity"]["overall"]}


def token_ids(count: int):
    """Embedded-corpus text in the embedded tokenizer's ids (valid ids for any vocab >= 2048)."""
    from ctp.data import load_text, tokenize
    from ctp.models import load_tokenizer

    ids = tokenize(load_tokenizer("embedded"), load_text("embedded", "train")[: count * 8])
    while ids.numel() < count:
        ids = ids.repeat(2)
    return ids[:count]


def reset_peak(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else 0.0


def tune_step(model, ids, args, device, checkpointing: bool) -> dict:
    from ctp.config import PromptConfig
    from ctp.prompt.tune import tune_prompt

    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=args.virtual_tokens,
                          steps=args.steps, lr=1e-3,
                          seqlen=args.train_seqlen, batch_size=args.batch_size, eval_every=10**6,
                          eval_windows=1, warmup_steps=0, precision="bf16",
                          gradient_checkpointing=checkpointing, device=str(device))
    reset_peak(device)
    result = tune_prompt(model, config, train_ids=ids, val_ids=ids[: args.train_seqlen * 2], progress=False)
    return {"tokens_per_second": result.meta["train_tokens_per_second_this_run"],
            "gpu_peak_gib": peak_gib(device), "gradient_checkpointing": checkpointing}


def peft_step(model, ids, args, device) -> dict:
    """The textbook loop: get_peft_model + model(input_ids, labels).loss, bf16 autocast."""
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                          num_virtual_tokens=args.virtual_tokens))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-5)
    chunks = ids[: (ids.numel() // args.train_seqlen) * args.train_seqlen].view(-1, args.train_seqlen)
    reset_peak(device)
    started, tokens = time.time(), 0
    for step in range(args.steps):
        x = chunks[(step * args.batch_size) % len(chunks):][: args.batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += x.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"tokens_per_second": round(tokens / (time.time() - started), 1), "gpu_peak_gib": peak_gib(device)}


def ppl_step(model, ids, args, device) -> dict:
    import torch

    from ctp.evaluation.perplexity import perplexity_of_ids

    seqlen = args.seqlen - args.virtual_tokens
    prompt = model.get_input_embeddings().weight[: args.virtual_tokens].detach().float().cpu()
    out = {}
    for name, p in (("no_prompt", None), ("prompt", prompt)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.time()
        r = perplexity_of_ids(model, ids, seqlen, prompt=p, batch_size=4, max_windows=args.ppl_windows)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[name] = {"tokens_per_second": round(r.windows * seqlen / (time.time() - started), 1),
                     "ppl": r.ppl, "windows": r.windows, "seqlen": seqlen}
    out["prompt_over_no_prompt_time"] = round(out["no_prompt"]["tokens_per_second"]
                                              / out["prompt"]["tokens_per_second"], 3)
    return out


def main() -> None:
    args = parse_args()
    import torch

    from ctp.models import load_any
    from ctp.runtime import resolve_device

    device = resolve_device(args.device)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "shape": {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "heads", "vocab")},
                    "versions": {"torch": torch.__version__}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        started = time.time()
        result["parameters"] = build_model(Path(tmp) / "dense", args, str(device))
        result["build_seconds"] = round(time.time() - started, 1)
        print(f"built {result['parameters'] / 1e9:.2f}B parameters in {result['build_seconds']} s", file=sys.stderr)
        result["compress"] = compress_step(Path(tmp) / "dense", Path(tmp) / "nf4", args)
        print(f"compress: {result['compress']}", file=sys.stderr)
        model = load_any(str(Path(tmp) / "nf4"), device=device)
        ids = token_ids(args.steps * args.batch_size * args.train_seqlen + args.ppl_windows * args.seqlen)
        result["tune"] = [tune_step(model, ids, args, device, ckpt) for ckpt in (False, True)]
        result["peft_loop"] = peft_step(model, ids, args, device)
        ratio = result["tune"][0]["tokens_per_second"] / result["peft_loop"]["tokens_per_second"]
        result["tune_over_peft"] = round(ratio, 3)
        print(f"tune: {result['tune']}, peft: {result['peft_loop']}", file=sys.stderr)
        result["perplexity"] = ppl_step(model, ids, args, device)
        result["targets"] = {"compress_under_3_min": result["compress"]["wall_seconds"] < 180,
                             "compress_under_8_gib_gpu": result["compress"]["gpu_peak_gib"] < 8,
                             "tune_at_least_0.9x_peft": ratio >= 0.9}
        result["total_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
