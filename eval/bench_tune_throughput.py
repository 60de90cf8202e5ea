"""Training throughput of `ctp tune-prompt` against a bare PEFT prompt-tuning loop.

    python eval/bench_tune_throughput.py        # ~3 minutes on 2 CPU cores

Same compressed model (the embedded model, Wanda 50% + NF4), same batch (8 windows of 256
tokens), same prompt length (50), same optimiser (AdamW). The PEFT loop is the textbook one:
``get_peft_model`` + ``model(input_ids, labels).loss`` + backward + step. ctp is timed through
``tune_prompt`` itself (its reported optimisation time, validation excluded). The two alternate
in rounds within one process so machine noise hits both; the medians' ratio is the overhead.
Writes eval/results/bench_tune_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctp.compression.pipeline import compress  # noqa: E402
from ctp.config import CompressConfig, PromptConfig  # noqa: E402
from ctp.demo import EMBEDDED_CALIB  # noqa: E402
from ctp.models import load_any  # noqa: E402
from ctp.prompt.tune import tune_prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def peft_loop(folder: str, ids: torch.Tensor, steps: int, n: int, batch: int, seqlen: int) -> float:
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = load_any(folder)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-5)
    chunks = ids[: (ids.numel() // seqlen) * seqlen].view(-1, seqlen)
    started = time.time()
    for step in range(steps):
        x = chunks[step * batch : (step + 1) * batch]
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch * seqlen / (time.time() - started)


def ctp_loop(folder: str, ids: torch.Tensor, steps: int, n: int, batch: int, seqlen: int) -> float:
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=n, data="embedded",
                          steps=steps, lr=1e-2, seqlen=seqlen,
                          batch_size=batch, eval_every=10**6, eval_windows=1, warmup_steps=0,
                          device="cpu")
    result = tune_prompt(load_any(folder), config, train_ids=ids, val_ids=ids[: seqlen * 2],
                         progress=False)
    return result.meta["train_tokens_per_second_this_run"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/ctp-eval-compression/models")
    args = p.parse_args()
    torch.set_num_threads(2)
    folder = Path(args.workdir) / "wanda-50pct+nf4"
    if not (folder / "ctp_compression.json").exists():
        compress("embedded", CompressConfig(prune="wanda", sparsity=0.5, quant="nf4", **EMBEDDED_CALIB),
                 folder, overwrite=True, progress=False)
    ids = torch.randint(0, 2048, (args.steps * 8 * 256 + 256,), generator=torch.Generator().manual_seed(0))
    n, batch, seqlen = 50, 8, 256
    peft_loop(str(folder), ids, 3, n, batch, seqlen)  # warm-up
    ours, theirs = [], []
    for _ in range(args.rounds):
        theirs.append(peft_loop(str(folder), ids, args.steps, n, batch, seqlen))
        ours.append(ctp_loop(str(folder), ids, args.steps, n, batch, seqlen))
    result = {
        "model": "embedded, wanda-50%+nf4 (bitsandbytes, CPU)", "batch": batch, "seqlen": seqlen,
        "virtual_tokens": n, "steps_per_round": args.steps, "rounds": args.rounds,
        "ctp_tokens_per_s": ours, "peft_tokens_per_s": theirs,
        "ctp_median": statistics.median(ours), "peft_median": statistics.median(theirs),
        "ctp_over_peft": round(statistics.median(ours) / statistics.median(theirs), 3),
        "overhead_percent": round((1 - statistics.median(ours) / statistics.median(theirs)) * 100, 1),
    }
    print(json.dumps(result, indent=2))
    (REPO / "eval" / "results" / "bench_tune_throughput.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
