"""``tune_prompt()``: learn a soft prompt on a frozen (compressed) model.

Training minimises the next-token NLL of each window's real tokens -- the very function
(:func:`ctp.evaluate.perplexity.token_nlls`) that scores evaluation, so the prompt is never
credited for predicting a window's first token or its own positions. The prompt with the best
validation perplexity is kept; the validation split is never the test split.

Runs resume exactly: the data order is a pure function of (seed, epoch), and a checkpoint holds
the prompt, AdamW moments, scheduler state, step, history and best prompt. Under
``accelerate launch`` (or torchrun) each process takes its share of every global batch and only
the prompt's gradient is averaged across processes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from .._io import atomic_dir, check_output_dir, read_json
from ..compress.pipeline import COMPRESSION_FILE, resolve_device
from ..compress.quantize import disable_cpu_packing_
from ..config import PromptConfig, to_dict
from ..data import load_documents, source_label, tokenize
from ..errors import CTPError
from ..evaluate.perplexity import model_context, token_nlls, window_nlls, windows_of
from ..models import load_any, load_tokenizer, tokenizer_fingerprint, weights_fingerprint
from .artifact import (find_checkpoint, load_checkpoint, optimizer_from_checkpoint,
                       optimizer_to_checkpoint, save_checkpoint, write_prompt_folder)

log = logging.getLogger(__name__)

PAPER_STEPS = 30000
PAPER_C4_DOCUMENTS = 5000
DEFAULT_SEQLEN = 1024


@dataclass
class TuneResult:
    """The learned prompt ``[n, hidden]`` (the best by validation), its metadata, its folder."""

    prompt: torch.Tensor
    meta: dict[str, Any]
    out: Path | None


class _Processes:
    """This process's place in a data-parallel run (a single process when not launched)."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.device = device
        if self.world > 1:
            from accelerate import PartialState

            state = PartialState(cpu=device.type == "cpu")
            self.rank, self.world, self.device = state.process_index, state.num_processes, state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes in place (reduced on this process's device: NCCL
        reduces only CUDA tensors)."""
        if self.world > 1:
            on_device = tensor.to(self.device)
            torch.distributed.all_reduce(on_device)
            tensor.copy_(on_device)
        return tensor

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` over processes in place."""
        if self.world > 1:
            self.sum_(tensor)
            tensor /= self.world
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def work_dir(out: str | os.PathLike) -> Path:
    """Where checkpoints of a run writing ``out`` live until it finishes: ``OUT.work``."""
    out = Path(out)
    return out.with_name(out.name + ".work")


def _init_prompt(config: PromptConfig, embed: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    n, (vocab, hidden) = config.num_virtual_tokens, embed.shape
    gen = torch.Generator().manual_seed(config.seed)
    weight = embed.detach().float().cpu()
    if config.init == "vocab":
        rows = torch.arange(n) % vocab
    elif config.init == "sample-vocab":
        rows = torch.randint(0, vocab, (n,), generator=gen)
    elif config.init == "random":
        return torch.randn(n, hidden, generator=gen) * weight.std()
    else:  # text:...
        ids = tokenizer(config.init[len("text:"):], add_special_tokens=False)["input_ids"]
        if not ids:
            raise CTPError("the init text has no tokens")
        rows = torch.tensor(ids)[torch.arange(n) % len(ids)]
    return weight[rows].clone()


def spread_windows(ids: torch.Tensor, seqlen: int, count: int | None) -> torch.Tensor:
    """At most ``count`` of the non-overlapping windows of ``ids``, spread evenly over the text
    (the first N windows of a corpus are rarely representative)."""
    windows = windows_of(ids, seqlen)
    if count is None or count >= windows.shape[0]:
        return windows
    return windows[torch.linspace(0, windows.shape[0] - 1, count).round().long()]


def _lr_lambda(config: PromptConfig, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def _training_text(config: PromptConfig) -> tuple[str, str]:
    """(train text, validation text) for the config's sources."""
    docs = load_documents(config.data, "train")
    limit = config.max_train_documents
    if limit is None and config.data == "c4":
        limit = PAPER_C4_DOCUMENTS
    if limit is not None:
        docs = docs[:limit]
    if config.val_data is not None:
        val_docs = load_documents(config.val_data, "validation")
    elif config.data in ("embedded", "wikitext2", "ptb", "c4"):
        val_docs = load_documents(config.data, "validation")
    else:
        raise CTPError(f"--data {config.data} is a file: give a separate --val-data file for "
                       "checkpoint selection")
    return "\n\n".join(docs), "\n\n".join(val_docs)


def _run_settings(config: PromptConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint (not how often it logs/saves)."""
    settings = to_dict(config)
    for key in ("save_every", "device"):
        settings.pop(key)
    return settings


def _model_record(model_dir: str | None, model: nn.Module) -> dict[str, Any]:
    record: dict[str, Any] = {"model": model_dir, "compression": None, "base_model": None}
    meta_path = Path(model_dir) / COMPRESSION_FILE if model_dir else None
    if meta_path is not None and meta_path.exists():
        meta = read_json(meta_path)
        record.update(base_fingerprint=meta["base_fingerprint"], base_model=meta["base_model"],
                      compression=meta["compression"], compression_label=meta.get("label"))
    elif not any(hasattr(p, "quant_state") for p in model.parameters()):
        record["base_fingerprint"] = weights_fingerprint(model)
        record["base_model"] = model_dir
        record["compression_label"] = "dense"
    else:
        record["base_fingerprint"] = None
    return record


def tune_prompt(
    model: str | nn.Module,
    config: PromptConfig | None = None,
    out: str | os.PathLike | None = None,
    *,
    tokenizer: Any = None,
    train_ids: torch.Tensor | None = None,
    val_ids: torch.Tensor | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TuneResult:
    """Learn a soft prompt for ``model`` and (when ``out`` is given) save it as a PEFT adapter.

    Args:
        model: a compressed or dense checkpoint folder / hub id / ``"embedded"``, or a loaded
            model (its parameters are frozen).
        config: prompt length, data, optimisation (defaults: the paper's).
        out: the prompt folder to write (atomically); checkpoints go to ``OUT.work`` meanwhile.
        train_ids, val_ids: ready 1-D token ids instead of ``config.data``'s text.
        resume: continue from the checkpoint in ``OUT.work`` (same settings required).
    Returns:
        the best prompt ``[n, hidden]`` (float32, CPU), the metadata written to
        ``ctp_prompt.json``, and the output folder.
    """
    config = config or PromptConfig()
    started = time.time()
    procs = _Processes(resolve_device(config.device))
    work = work_dir(out) if out is not None else None
    if out is not None:
        check_output_dir(out, overwrite)
        has_checkpoint = find_checkpoint(work) is not None
        if overwrite and not resume and has_checkpoint and procs.main:
            shutil.rmtree(work, ignore_errors=True)  # --overwrite starts over
            has_checkpoint = False
        if resume and not has_checkpoint:
            raise CTPError(f"--resume: no checkpoint to resume in {work}")
        if has_checkpoint and not resume and not overwrite:
            raise CTPError(f"{work} holds a checkpoint of an interrupted run: pass --resume to "
                           "continue it or --overwrite to start over")
    elif resume:
        raise CTPError("resume needs an output folder")

    model_dir = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
    if isinstance(model, str):
        loaded = load_any(model, device=procs.device)
        tokenizer = tokenizer or load_tokenizer(model)
        model = loaded
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    disable_cpu_packing_(model)
    device = model.get_input_embeddings().weight.device
    embed = model.get_input_embeddings().weight
    hidden = embed.shape[1]
    n = config.num_virtual_tokens

    context = model_context(model)
    if context is not None and n >= context:
        raise CTPError(f"num_virtual_tokens {n} must be below the model's context of {context}")
    if config.seqlen is not None:
        seqlen = config.seqlen
        if context is not None and seqlen + n > context:
            raise CTPError(f"seqlen {seqlen} plus {n} virtual tokens exceeds the model's context "
                           f"of {context}")
    else:
        seqlen = min(DEFAULT_SEQLEN, (context - n) if context else DEFAULT_SEQLEN)

    given_ids = train_ids is not None and val_ids is not None
    if not given_ids:
        if tokenizer is None:
            raise CTPError("tune_prompt needs a tokenizer, or train_ids and val_ids")
        train_text, val_text = _training_text(config)
        train_ids = tokenize(tokenizer, train_text) if train_ids is None else train_ids
        val_ids = tokenize(tokenizer, val_text) if val_ids is None else val_ids
    if train_ids.numel() < seqlen:
        raise CTPError(f"the training text has {train_ids.numel()} tokens, fewer than one window of {seqlen}")
    if val_ids.numel() < seqlen:
        raise CTPError(f"the validation split is empty: {val_ids.numel()} tokens, fewer than one "
                       f"window of {seqlen}")
    chunks = windows_of(train_ids, seqlen)
    val_windows = spread_windows(val_ids, seqlen, config.eval_windows)

    per_step = config.batch_size * config.grad_accum * procs.world
    steps = config.steps or (math.ceil(config.epochs * chunks.shape[0] / per_step) if config.epochs
                             else PAPER_STEPS)
    warmup = config.warmup_steps if config.warmup_steps is not None else min(500, steps // 10)

    prompt = nn.Parameter(_init_prompt(config, embed, tokenizer).to(device))
    optimizer = torch.optim.AdamW([prompt], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps, warmup))
    record = _model_record(None if model_dir is None else str(model_dir), model)
    settings = {"config": _run_settings(config), "steps": steps, "world": procs.world,
                "train_tokens": int(train_ids.numel()), "val_tokens": int(val_ids.numel()),
                "hidden": hidden, "model": str(model_dir),
                "model_identity": [record.get("base_fingerprint"), record.get("compression")]}
    history: dict[str, list] = {"step": [], "train_loss": [], "eval_step": [], "val_ppl": []}
    best = {"val_ppl": math.inf, "step": 0}
    best_prompt = prompt.detach().clone()
    start_step = 0

    if resume:
        tensors, state = load_checkpoint(find_checkpoint(work))
        if state["settings"] != settings:
            diff = sorted(k for k in set(settings) | set(state["settings"])
                          if settings.get(k) != state["settings"].get(k))
            raise CTPError(f"--resume: the checkpoint in {work} was made with different settings "
                           f"({', '.join(diff)})")
        with torch.no_grad():
            prompt.copy_(tensors["prompt"])
        best_prompt = tensors["best_prompt"].to(device)
        optimizer_from_checkpoint(optimizer, tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, history, best = state["step"], state["history"], state["best"]
        log.info("resuming at step %d of %d", start_step, steps)

    autocast = _autocast(config.precision, device)
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def validate() -> float:
        shard = val_windows[procs.rank :: procs.world]
        with autocast:
            nll = window_nlls(model, shard, prompt.detach(), config.batch_size) if shard.numel() else torch.zeros(0)
        total = procs.sum_(torch.tensor([nll.sum().item(), float(nll.numel())], dtype=torch.float64))
        return math.exp(total[0].item() / total[1].item())

    baseline_ppl = None
    if start_step == 0:
        with autocast:
            shard = val_windows[procs.rank :: procs.world]
            nll = window_nlls(model, shard, None, config.batch_size)
        total = procs.sum_(torch.tensor([nll.sum().item(), float(nll.numel())], dtype=torch.float64))
        baseline_ppl = math.exp(total[0].item() / total[1].item())
        first = validate()
        history["eval_step"].append(0)
        history["val_ppl"].append(first)
        best = {"val_ppl": first, "step": 0}
    else:
        baseline_ppl = history.get("val_ppl_without_prompt")
    history["val_ppl_without_prompt"] = baseline_ppl

    orders: dict[int, torch.Tensor] = {}

    def sample(global_index: int) -> torch.Tensor:
        epoch, pos = divmod(global_index, chunks.shape[0])
        if epoch not in orders:
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            orders.clear()
            orders[epoch] = torch.randperm(chunks.shape[0], generator=gen)
        return chunks[orders[epoch][pos]]

    bar = tqdm(range(start_step, steps), desc="tune-prompt", disable=not (progress and procs.main),
               initial=start_step, total=steps)
    train_started, tokens, eval_seconds = time.time(), 0, 0.0
    for step in bar:
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro in range(config.grad_accum):
            base = step * per_step + (micro * procs.world + procs.rank) * config.batch_size
            batch = torch.stack([sample(base + j) for j in range(config.batch_size)]).to(device)
            with autocast:
                loss = token_nlls(model, batch, prompt).mean()
            (loss / config.grad_accum).backward()
            loss_sum += loss.detach().double().cpu()
            tokens += batch.numel()
        procs.mean_(prompt.grad)
        if step == start_step and not prompt.grad.any():
            raise CTPError("the prompt's gradient is exactly zero: the model does not pass "
                           "gradients back to its input embeddings")
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([prompt], config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = procs.mean_(loss_sum / config.grad_accum).item()
        history["step"].append(step + 1)
        history["train_loss"].append(train_loss)
        done = step + 1
        postfix = {"loss": f"{train_loss:.4f}", "best val ppl": f"{best['val_ppl']:.3f}"}
        if done % config.eval_every == 0 or done == steps:
            eval_started = time.time()
            val_ppl = validate()
            eval_seconds += time.time() - eval_started
            history["eval_step"].append(done)
            history["val_ppl"].append(val_ppl)
            if val_ppl < best["val_ppl"]:
                best = {"val_ppl": val_ppl, "step": done}
                best_prompt = prompt.detach().clone()
            postfix["val ppl"] = f"{val_ppl:.3f}"
        bar.set_postfix(postfix, refresh=False)
        if work is not None and done % config.save_every == 0 and done < steps:
            if procs.main:
                opt_tensors, opt_meta = optimizer_to_checkpoint(optimizer)
                save_checkpoint(work / "checkpoint",
                                {"prompt": prompt, "best_prompt": best_prompt, **opt_tensors},
                                {"settings": settings, "step": done, "history": history,
                                 "best": best, "optimizer": opt_meta,
                                 "scheduler": scheduler.state_dict()})
            procs.barrier()
    bar.close()
    train_seconds = time.time() - train_started - eval_seconds  # optimisation only

    meta = {
        "ctp_version": __version__,
        **record,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "hidden_size": hidden,
        "num_virtual_tokens": n,
        "prompt_config": to_dict(config),
        "seqlen": seqlen,
        "steps": steps,
        "warmup_steps": warmup,
        "processes": procs.world,
        "global_batch": per_step,
        "training_data": {"source": "tensor" if given_ids else source_label(config.data),
                          "tokens": int(train_ids.numel()), "windows": int(chunks.shape[0])},
        "validation_data": {"source": "tensor" if given_ids else source_label(config.val_data or config.data),
                            "split": "validation", "windows": int(val_windows.shape[0])},
        "val_ppl_without_prompt": baseline_ppl,
        "best_val_ppl": best["val_ppl"],
        "best_step": best["step"],
        "history": history,
        "train_seconds_this_run": round(train_seconds, 2),
        "train_tokens_per_second_this_run": round(tokens * procs.world / max(train_seconds, 1e-9), 1),
        "seconds": round(time.time() - started, 2),
    }
    if baseline_ppl is not None and best["val_ppl"] >= baseline_ppl:
        log.warning("the best prompt (validation ppl %.4f) does not beat the model without a "
                    "prompt (%.4f): it will not help", best["val_ppl"], baseline_ppl)
    best_cpu = best_prompt.detach().float().cpu()
    if out is not None and procs.main:
        with atomic_dir(out, overwrite=overwrite) as staging:
            config_obj = getattr(model, "config", None)
            write_prompt_folder(staging, best_cpu, str(model_dir),
                                getattr(config_obj, "num_hidden_layers", 0),
                                getattr(config_obj, "num_attention_heads", 0), meta)
            plot_curve(history, staging / "training_curve.png")
        shutil.rmtree(work, ignore_errors=True)
    procs.barrier()
    return TuneResult(prompt=best_cpu, meta=meta, out=Path(out) if out is not None else None)


class _NoAutocast:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _autocast(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return _NoAutocast()


def plot_curve(history: dict[str, list], path: Path) -> None:
    """Training loss and validation perplexity against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if history["step"]:
        ax.plot(history["step"], history["train_loss"], color="tab:blue", alpha=0.35, lw=0.8)
        window = max(1, len(history["train_loss"]) // 50)
        smooth = torch.tensor(history["train_loss"]).unfold(0, window, 1).mean(1) if len(history["train_loss"]) >= window else None
        if smooth is not None:
            ax.plot(history["step"][window - 1:], smooth.tolist(), color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats / token)", color="tab:blue")
    twin = ax.twinx()
    twin.plot(history["eval_step"], history["val_ppl"], "o-", color="tab:red", ms=3, label="validation ppl")
    if history.get("val_ppl_without_prompt"):
        twin.axhline(history["val_ppl_without_prompt"], color="tab:gray", ls="--", lw=1,
                     label="validation ppl, no prompt")
    twin.set_ylabel("validation perplexity", color="tab:red")
    twin.legend(loc="upper right", fontsize=8)
    ax.set_title("ctp tune-prompt")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
