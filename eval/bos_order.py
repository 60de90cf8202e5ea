"""Where does a soft prompt go on a model that depends on BOS: before BOS or after it?

    python eval/bos_order.py --model /path/to/compressed-gemma3 [--steps 150]

ctp puts BOS first, then the prompt, then the text (``--bos auto`` on the Gemma families). This
script checks that order by measurement: the same 10-token input prompt (the embeddings of the
first tokens of a seeded training window), trained with the same loop, data, seed and budget
(AdamW lr 1e-2, linear decay after 20 warm-up steps, ``--steps`` steps of 4 x 128 tokens of the
embedded train split, next-token loss on the real tokens), once in each order:

- ``bos-first``: BOS, prompt, text -- ctp's order (``ctp.lm.context_cache(model, prompt, bos)``);
- ``prompt-first``: prompt, BOS, text -- the prompt as n+1 positions whose last is BOS's own
  embedding, frozen.

Both are scored on the same test windows (the first ``--test-windows``, default 64, windows of
256 tokens of the embedded test split), and without a prompt (BOS, text). Writes ``eval/results/bos_order.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctp.config import PromptConfig  # noqa: E402
from ctp.data import load_text, tokenize  # noqa: E402
from ctp.evaluation.perplexity import perplexity_of_ids  # noqa: E402
from ctp.lm import bos_token, context_cache, token_nlls, windows_of  # noqa: E402
from ctp.models import load_any, load_tokenizer  # noqa: E402
from ctp.prompt.state import init_prompt, lr_factor  # noqa: E402


def train(model, bos_embed, bos, start, chunks, steps, order, seed=0):
    """``steps`` steps of the prompt in ``order``; returns the trained prompt ``[n, hidden]``."""
    prompt = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([prompt], lr=1e-2, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor("linear", steps, 20))
    perm = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003))
    for step in range(steps):
        batch = chunks[perm[step * 4:(step + 1) * 4]]
        loss = token_nlls(model, batch, cache(model, prompt, bos_embed, bos, order)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([prompt], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return prompt.detach()


def cache(model, prompt, bos_embed, bos, order):
    if order == "bos-first":
        return context_cache(model, prompt, bos)
    return context_cache(model, torch.cat([prompt, bos_embed]))  # prompt, then BOS's own embedding


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a (compressed) model of a family that needs BOS")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--test-windows", type=int, default=64, help="test windows of 256 tokens scored")
    p.add_argument("--out", default=str(REPO / "eval" / "results" / "bos_order.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = load_any(args.model, device="cpu")
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer = load_tokenizer(args.model)
    bos = bos_token("always", model.config, tokenizer)
    bos_embed = model.get_input_embeddings()(torch.tensor([bos])).detach().float()
    train_ids = tokenize(tokenizer, load_text("embedded", "train", max_documents=1500), bos)
    chunks = windows_of(train_ids, 128)
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=10, init="window")
    start = init_prompt(config, model.get_input_embeddings().weight, tokenizer, train_ids)
    test = tokenize(tokenizer, load_text("embedded", "test"), bos)
    with torch.no_grad():
        bare = perplexity_of_ids(model, test, 256, context_cache(model, None, bos), 8, args.test_windows).ppl
    result = {"model": args.model, "steps": args.steps, "batch": "4 x 128",
              "test": f"embedded, {args.test_windows} x 256",
              "ppl_no_prompt": bare, "orders": {}}
    for order in ("bos-first", "prompt-first"):
        started = time.time()
        prompt = train(model, bos_embed, bos, start, chunks, args.steps, order)
        with torch.no_grad():
            ppl = perplexity_of_ids(model, test, 256, cache(model, prompt, bos_embed, bos, order), 8,
                                    args.test_windows).ppl
            untrained = perplexity_of_ids(model, test, 256, cache(model, start, bos_embed, bos, order), 8, args.test_windows).ppl
        result["orders"][order] = {"ppl": ppl, "ppl_at_start": untrained, "seconds": round(time.time() - started, 1),
                                   "gain_log": math.log(bare) - math.log(ppl)}
        print(order, result["orders"][order], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
