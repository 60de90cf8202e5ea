"""Where does a soft prompt go on a model that depends on BOS: before BOS or after it?

    python eval/bos_order.py --model /path/to/compressed-gemma3 [--steps 150] [--kinds input,kv]

Both prompt kinds, each trained with the same loop, data, seed and budget (AdamW lr 1e-2, linear
decay after 20 warm-up steps, ``--steps`` steps of 4 x 128 tokens of the embedded train split,
next-token loss on the real tokens), once in each order:

- ``bos-first``: BOS, prompt, text;
- ``prompt-first``: prompt, BOS, text -- where PEFT itself puts its virtual tokens (before
  everything the tokenizer produced, BOS included).

The input prompt starts from the embeddings of the first tokens of a seeded training window; in
``prompt-first`` it is run as ``n + 1`` positions whose last is BOS's own embedding, frozen. The
key/value prompt starts from the target's own keys and values over that input prompt in the
same order (BOS first: what the prompt's positions hold after BOS; prompt first: the prompt's
positions alone); in ``prompt-first`` BOS is run after the learned keys and values at position
``n`` and attends to them (the gradient flows through it).

All are scored on the same test windows (the first ``--test-windows``, default 64, windows of
256 tokens of the embedded test split), beside no prompt (BOS, text). Writes
``eval/results/bos_order.json`` (resumable: cells already in it are kept).
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
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctp.config import PromptConfig  # noqa: E402
from ctp.data import load_text, tokenize  # noqa: E402
from ctp.errors import CTPError  # noqa: E402
from ctp.evaluation.perplexity import perplexity_of_ids  # noqa: E402
from ctp.lm import (PromptCache, bos_token, cache_of_keys_values, context_cache, restore_layer,  # noqa: E402
                    token_nlls, windows_of)
from ctp.models import load_any, load_tokenizer  # noqa: E402
from ctp.prompt.kinds import initial_prompt  # noqa: E402
from ctp.prompt.state import init_prompt, lr_factor  # noqa: E402


def train(make_cache, params, chunks, steps, seed=0):
    """``steps`` steps of ``params`` (the prompt's tensors), the context built by ``make_cache``."""
    params = [torch.nn.Parameter(t.detach().clone()) for t in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor("linear", steps, 20))
    perm = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003))
    for step in tqdm(range(steps), desc="steps", leave=False):
        batch = chunks[perm[step * 4:(step + 1) * 4]]
        loss = token_nlls(make_cache.model, batch, make_cache(params)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return [t.detach() for t in params]


class InputOrder:
    """An input prompt ``[n, hidden]`` in one order."""

    def __init__(self, model, bos, order):
        self.model, self.bos, self.order = model, bos, order
        self.bos_embed = model.get_input_embeddings()(torch.tensor([bos])).detach().float()

    def start(self, embeds):
        return [embeds]

    def __call__(self, params):
        (prompt,) = params
        if self.order == "bos-first":
            return context_cache(self.model, prompt, self.bos)
        return context_cache(self.model, torch.cat([prompt, self.bos_embed]))  # prompt, BOS's own embedding


class KVOrder:
    """A key/value prompt (per layer ``[kv_heads, n, head_dim]``) in one order."""

    def __init__(self, model, bos, order):
        self.model, self.bos, self.order = model, bos, order

    def start(self, embeds):
        """ctp's own start (the model's keys and values over ``embeds``), computed after BOS
        (bos-first) or with nothing before it (prompt-first)."""
        keys, values = initial_prompt("kv", embeds, self.model, self.model,
                                      self.bos if self.order == "bos-first" else None).keys_values()
        return keys + values

    def __call__(self, params):
        half = len(params) // 2
        keys, values = params[:half], params[half:]
        if self.order == "bos-first":
            return cache_of_keys_values(self.model, keys, values, self.bos)
        from transformers import DynamicCache

        n = keys[0].shape[1]
        cache = DynamicCache(config=self.model.config)
        for layer, k, v in zip(cache.layers, keys, values, strict=True):
            restore_layer(layer, k.unsqueeze(0), v.unsqueeze(0), n)
        out = self.model(input_ids=torch.tensor([[self.bos]]), position_ids=torch.tensor([[n]]),
                         cache=cache, use_cache=True, logits_to_keep=1)
        return PromptCache(keys=tuple(layer.keys for layer in cache.layers),
                           values=tuple(layer.values for layer in cache.layers), num_virtual_tokens=n,
                           config=self.model.config, bos=True, bos_logits=out.logits.detach())


KINDS = {"input": InputOrder, "kv": KVOrder}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a (compressed) model of a family that needs BOS")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--test-windows", type=int, default=64, help="test windows of 256 tokens scored")
    p.add_argument("--kinds", default="input,kv", help="prompt kinds measured, comma-separated")
    p.add_argument("--out", default=str(REPO / "eval" / "results" / "bos_order.json"))
    args = p.parse_args()
    kinds = args.kinds.split(",")
    if any(kind not in KINDS for kind in kinds):
        p.error(f"--kinds: choose from {', '.join(KINDS)}, comma-separated")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = load_any(args.model, device="cpu")
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer = load_tokenizer(args.model)
    bos = bos_token("always", model.config, tokenizer)
    train_ids = tokenize(tokenizer, load_text("embedded", "train", max_documents=1500), bos)
    chunks = windows_of(train_ids, 128)
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=10, init="window")
    embeds = init_prompt(config, model.get_input_embeddings().weight, tokenizer, train_ids)
    test = tokenize(tokenizer, load_text("embedded", "test"), bos)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    same = {"model": args.model, "steps": args.steps, "batch": "4 x 128",
            "test": f"embedded, {args.test_windows} x 256"}
    if any(result.get(k) != v for k, v in same.items()):
        result = dict(same, cells={})
    result.setdefault("cells", {})

    def score(cache):
        with torch.no_grad():
            return perplexity_of_ids(model, test, 256, cache, 8, args.test_windows).ppl

    if "ppl_no_prompt" not in result:
        result["ppl_no_prompt"] = score(context_cache(model, None, bos))
    def save():  # whole or not at all: a killed run resumes from the file
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)

    for kind in kinds:
        for order in ("bos-first", "prompt-first"):
            name = f"{kind}/{order}"
            if name in result["cells"]:
                continue
            started = time.time()
            make_cache = KINDS[kind](model, bos, order)
            start = make_cache.start(embeds)
            trained = train(make_cache, start, chunks, args.steps)
            with torch.no_grad():
                ppl, at_start = score(make_cache(trained)), score(make_cache(start))
            result["cells"][name] = {"ppl": ppl, "ppl_at_start": at_start,
                                     "seconds": round(time.time() - started, 1),
                                     "gain_log": math.log(result["ppl_no_prompt"]) - math.log(ppl)}
            print(name, result["cells"][name], flush=True)
            save()
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    try:
        main()
    except CTPError as exc:  # bad input: one line, no traceback
        sys.exit(f"{Path(__file__).name}: error: {exc}")
