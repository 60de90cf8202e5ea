"""Train the embedded model: a small Llama with its own byte-level BPE on the embedded corpus.

The committed model in ctp/assets/embedded-llama was made by running, from the repository root:

    python eval/train_embedded_model.py --out ctp/assets/embedded-llama

(defaults below; about 15 minutes on 2 CPU cores). It trains for less than one epoch of the
train split so that validation and train perplexity stay close (no memorisation), then records
train / validation / test perplexity (protocol of ctp.evaluation.perplexity, seqlen 512) in
``training.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctp.data import embedded_corpus_dir, embedded_corpus_info, tokenize  # noqa: E402
from ctp.evaluation.perplexity import perplexity_of_ids  # noqa: E402


def train_tokenizer(train_file: Path, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``train_file``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
    )


TRAIN_PPL_NOTE = ("train = 400 windows spread evenly over the whole train split; "
                  "validation/test = every window of the split")


def measure(model, ids: dict, context: int) -> dict:
    """Perplexity on train (400 evenly spread windows), validation and test (whole splits)."""
    ppl = {}
    for split in ("train", "validation", "test"):
        split_ids = ids[split]
        if split == "train":
            windows = split_ids[: split_ids.numel() // context * context].view(-1, context)
            pick = torch.linspace(0, windows.shape[0] - 1, 400).long()
            split_ids = windows[pick].reshape(-1)
        ppl[split] = round(perplexity_of_ids(model, split_ids, context).ppl, 4)
    print("perplexity", ppl, flush=True)
    return ppl


def eval_only(out: Path) -> None:
    """Re-measure a trained model in ``out`` and update its training.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    corpus = embedded_corpus_dir()
    ids = {s: tokenize(tokenizer, (corpus / f"{s}.txt").read_text()) for s in ("train", "validation", "test")}
    record = json.loads((out / "training.json").read_text())
    record["perplexity"] = measure(model, ids, model.config.max_position_embeddings)
    record["perplexity_note"] = TRAIN_PPL_NOTE
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="ctp/assets/embedded-llama")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-only", action="store_true",
                   help="re-measure the model already in --out and update its training.json")
    args = p.parse_args()
    if args.eval_only:
        torch.set_num_threads(args.threads)
        eval_only(Path(args.out))
        return

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    corpus = embedded_corpus_dir()
    tokenizer = train_tokenizer(corpus / "train.txt", args.vocab_size)
    ids = {s: tokenize(tokenizer, (corpus / f"{s}.txt").read_text()) for s in ("train", "validation", "test")}
    print({s: v.numel() for s, v in ids.items()}, f"tokenized in {time.time() - start:.0f}s", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    train_ids = ids["train"]
    model.train()
    losses = []
    for step in range(args.steps):
        starts = torch.randint(0, train_ids.numel() - args.context - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.context] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            recent = sum(losses[-25:]) / 25
            print(f"step {step + 1}/{args.steps} loss {recent:.3f} ppl {math.exp(recent):.2f} "
                  f"{time.time() - start:.0f}s", flush=True)
    train_time = time.time() - start
    tokens_seen = args.steps * args.batch_size * args.context

    model.eval()
    model = model.half().float()  # score exactly the weights that are committed (fp16)
    ppl = measure(model, ids, args.context)

    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix=".embedded-", dir=out.parent if out.parent.exists() else None))
    model.half().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    corpus_info = embedded_corpus_info()
    record = {
        "command": "python eval/train_embedded_model.py " + " ".join(sys.argv[1:]),
        "arguments": vars(args),
        "parameters": params,
        "train_tokens_seen": tokens_seen,
        "epochs_of_train_split": round(tokens_seen / ids["train"].numel(), 3),
        "split_tokens": {s: v.numel() for s, v in ids.items()},
        "train_seconds": round(train_time, 1),
        "final_train_loss_25_steps": round(sum(losses[-25:]) / 25, 4),
        "perplexity_seqlen": args.context,
        "perplexity": ppl,
        "perplexity_note": TRAIN_PPL_NOTE,
        "corpus": corpus_info,
        "torch": torch.__version__,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    for path in [tmp, *tmp.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    print(f"saved to {out}", flush=True)


if __name__ == "__main__":
    main()
