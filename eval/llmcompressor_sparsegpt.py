"""Reference pruning with llm-compressor (vllm-project/llm-compressor), the production peer.

Runs llm-compressor's ``oneshot()`` with ``SparseGPTModifier`` (or ``WandaPruningModifier``)
on CPU, on exactly the calibration windows given in a safetensors file, and saves the pruned
model as a plain dense Hugging Face checkpoint that ctp (or any plain ``transformers``) loads.

It runs INSIDE llm-compressor's own virtual environment, never ctp's, and does not import ctp
(llm-compressor pins its own transformers):

    bash eval/setup_llmcompressor_env.sh             # once: eval/.venv-llmcompressor
    eval/.venv-llmcompressor/bin/python eval/llmcompressor_sparsegpt.py \\
        --model ctp/assets/embedded-llama --calib calib.safetensors \\
        --sparsity 0.5 --out /tmp/llmc-sparsegpt-50          # or: --pattern 2:4

What it does, and the choices made:

* Calibration: ``--calib`` holds a LongTensor ``input_ids`` [nsamples, seqlen]. Each row becomes
  one already-tokenized row of a ``datasets.Dataset`` (column ``input_ids`` only). oneshot then
  skips tokenization, ``shuffle_calibration_samples=False`` and ``batch_size=1`` keep every
  window whole (the truncation collator never cuts a batch of one), and
  ``num_calibration_samples=nsamples`` uses all of them. The windows are checked to be the only
  thing the model sees (a forward pre-hook counts them).
* Modifier: ``block_size=128``, ``dampening_frac=0.01``, ``sparsity`` (unstructured) or
  ``mask_structure="N:M"`` (then ``sparsity`` is N/M, which the N:M mask ignores). ``targets``
  are the decoder layers (every Linear inside them is pruned: q/k/v/o and gate/up/down);
  ``ignore`` adds ``re:.*lm_head``, so the head (and the embeddings) stay dense.
* Pipeline: ``pipeline="sequential"`` (what oneshot infers for these modifiers anyway): the
  model is traced into one subgraph per decoder layer; each layer is calibrated on the cached
  inputs, pruned, and its *pruned* outputs are what the next layer is calibrated on, as in
  SparseGPT proper.
* Precision: the model is loaded in float32 for calibration (``--dtype``; fp16 matmuls on CPU are
  slow), as ctp does on CPU. SparseGPT itself works in fp32 either way. The pruned model is saved
  in the checkpoint's own dtype unless ``--save-dtype`` says otherwise.
* Saving: llm-compressor wraps ``model.save_pretrained`` to write its compressed-tensors format
  and adds a ``quantization_config``/``sparsity_config`` that plain transformers cannot load
  without the compressed-tensors package. So no ``output_dir`` is given to oneshot; afterwards its
  CPU "offload" wrappers are removed and the class's own, unwrapped
  ``PreTrainedModel.save_pretrained`` writes a dense safetensors checkpoint with HF names and an
  unmodified config. A tokenizer found in ``--model`` is copied along.
* Timing: ``oneshot_s`` is the wall time of the ``oneshot()`` call alone (it includes
  llm-compressor's tracing of the model and its dataloader setup, not model loading or saving);
  ``script_s`` is the whole script from interpreter start (imports included) to ``timing.json``.
  Both, the thread count and the achieved sparsity per tensor go to ``OUT/timing.json``.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # whole-script clock starts before the heavy imports

import argparse
import json
import os
import platform
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face causal-LM folder")
    p.add_argument("--calib", required=True, help="safetensors file with LongTensor input_ids [n, seqlen]")
    p.add_argument("--out", required=True, help="output folder (pruned model + timing.json)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--sparsity", type=float, help="unstructured sparsity, e.g. 0.5")
    how.add_argument("--pattern", help="N:M semi-structured sparsity, e.g. 2:4")
    p.add_argument("--method", choices=("sparsegpt", "wanda"), default="sparsegpt")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT columns per block")
    p.add_argument("--dampening-frac", type=float, default=0.01, help="SparseGPT Hessian damping")
    p.add_argument("--dtype", default="float32", help="dtype the model is calibrated in")
    p.add_argument("--save-dtype", default=None, help="dtype of the saved weights (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return p.parse_args()


def load_calibration(path: str) -> torch.Tensor:
    tensors = load_file(path)
    if "input_ids" not in tensors:
        raise SystemExit(f"{path} has no 'input_ids' tensor (has: {sorted(tensors)})")
    ids = tensors["input_ids"]
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise SystemExit(f"input_ids must be a LongTensor [nsamples, seqlen], got {ids.dtype} {tuple(ids.shape)}")
    return ids


def make_modifier(args: argparse.Namespace, decoder_targets: list[str]):
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    if args.pattern:
        if not re.fullmatch(r"\d+:\d+", args.pattern):
            raise SystemExit(f"--pattern must look like N:M, got {args.pattern!r}")
        n, m = (int(x) for x in args.pattern.split(":"))
        sparsity, mask = n / m, args.pattern  # sparsity is required but unused by N:M masks
    else:
        sparsity, mask = args.sparsity, "0:0"  # 0:0 = unstructured
    common = dict(
        sparsity=sparsity,
        mask_structure=mask,
        targets=decoder_targets,  # prune the Linears inside each decoder layer ...
        ignore=["re:.*lm_head"],  # ... and never the head
    )
    if args.method == "wanda":
        return WandaPruningModifier(**common)
    return SparseGPTModifier(block_size=args.block_size, dampening_frac=args.dampening_frac, **common)


def sparsity_report(model: torch.nn.Module) -> dict:
    """Zero fraction of every 2-D weight, and of the decoder Linears (the pruned ones) together."""
    per_tensor, zeros, total = {}, 0, 0
    for name, p in model.state_dict().items():
        if p.dim() != 2:
            continue
        z = int((p == 0).sum())
        per_tensor[name] = round(z / p.numel(), 6)
        if ".layers." in name and name.endswith("_proj.weight"):
            zeros, total = zeros + z, total + p.numel()
    return {"decoder_linears": zeros / max(total, 1), "per_tensor": per_tensor}


def nm_ok(model: torch.nn.Module, n: int, m: int) -> bool:
    """True when every decoder Linear has at least n zeros in each group of m consecutive input
    weights (llm-compressor's "N:M" = N pruned out of every M, as in ctp's --pattern)."""
    for name, p in model.state_dict().items():
        if ".layers." in name and name.endswith("_proj.weight"):
            groups = (p == 0).reshape(p.shape[0], -1, m).sum(-1)
            if bool((groups < n).any()):
                return False
    return True


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import llmcompressor
    import transformers
    from compressed_tensors.offload import remove_dispatch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = load_calibration(args.calib)
    nsamples, seqlen = ids.shape

    # The checkpoint's own dtype (config.json), the default for saving.
    raw_cfg = json.loads((Path(args.model) / "config.json").read_text())
    saved_dtype = args.save_dtype or raw_cfg.get("dtype") or raw_cfg.get("torch_dtype") or "float32"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    # The decoder-layer classes (LlamaDecoderLayer, ...): the sequential pipeline's split points
    # and the modifier's targets.
    decoder_targets = list(getattr(model, "_no_split_modules", None) or []) or [r"re:.*\.layers\.\d+$"]

    # oneshot needs a processor object whenever a dataset is given, even a tokenized one; it
    # loads one from the model folder. A folder without a tokenizer (random-weight timing models)
    # gets a stand-in: with pre-tokenized data and the truncation collator it is never used.
    has_tokenizer = any((Path(args.model) / f).exists() for f in TOKENIZER_FILES)
    processor = None if has_tokenizer else object()

    # Pre-tokenized dataset: exactly the given windows, one row each, nothing else.
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})

    # Record every token row that reaches the embedding layer during oneshot, to check that the
    # model saw exactly the calibration windows, whole, and nothing else.
    calib_rows = {tuple(r) for r in ids.tolist()}
    seen = {"calls": 0, "rows": set(), "shapes": set()}

    def count_inputs(_mod, inp):
        x = inp[0]
        if x.is_meta:  # llm-compressor's torch.fx tracing of the model (shapes only)
            return
        seen["calls"] += 1
        seen["shapes"].add(tuple(x.shape))
        seen["rows"].update(tuple(r) for r in x.reshape(-1, x.shape[-1]).tolist())

    hook = model.get_input_embeddings().register_forward_pre_hook(count_inputs)

    modifier = make_modifier(args, decoder_targets)
    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=processor,
        recipe=modifier,
        dataset=dataset,
        num_calibration_samples=nsamples,
        shuffle_calibration_samples=False,
        batch_size=1,
        max_seq_length=seqlen,
        pipeline="sequential",
        # no output_dir: the compressed-tensors save is skipped, saved below instead
    )
    oneshot_s = time.perf_counter() - t0
    hook.remove()

    # Undo llm-compressor's CPU offload wrappers, then the plain (unwrapped) HF save.
    remove_dispatch(model)
    model.to(getattr(torch, saved_dtype))
    report = sparsity_report(model)
    type(model).save_pretrained(model, out)  # the class's method, not llm-compressor's wrapper
    for f in TOKENIZER_FILES:
        if (Path(args.model) / f).exists():
            shutil.copy2(Path(args.model) / f, out / f)

    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "sparsity_config" not in cfg, "non-plain config saved"

    timing = {
        "tool": "llm-compressor",
        "llmcompressor": llmcompressor.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "method": args.method,
        "sparsity": args.sparsity,
        "pattern": args.pattern,
        "block_size": args.block_size if args.method == "sparsegpt" else None,
        "dampening_frac": args.dampening_frac if args.method == "sparsegpt" else None,
        "pipeline": "sequential",
        "targets": decoder_targets,
        "ignore": ["re:.*lm_head"],
        "model": str(args.model),
        "calib": str(args.calib),
        "nsamples": nsamples,
        "seqlen": seqlen,
        # What reached the embedding layer during oneshot (real tensors; the tracing pass runs
        # on meta tensors and is skipped). The sequential pipeline runs the first subgraph
        # (embedding + layer 0) twice per window: calibrate, then propagate the pruned outputs.
        "embedding_calls": seen["calls"],
        "embedding_input_shapes": sorted(seen["shapes"]),
        "exactly_calib_rows_seen": seen["rows"] == calib_rows,
        "calib_dtype": args.dtype,
        "saved_dtype": saved_dtype,
        "threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cpu": platform.processor() or platform.machine(),
        "oneshot_s": round(oneshot_s, 3),
        "achieved_sparsity_decoder_linears": round(report["decoder_linears"], 6),
        "lm_head_sparsity": report["per_tensor"].get("lm_head.weight"),
        "nm_pattern_holds": nm_ok(model, *map(int, args.pattern.split(":"))) if args.pattern else None,
        "per_tensor_sparsity": report["per_tensor"],
    }
    timing["script_s"] = round(time.perf_counter() - _T0, 3)
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    print(json.dumps({k: v for k, v in timing.items() if k != "per_tensor_sparsity"}, indent=2))


if __name__ == "__main__":
    main()
