"""``tune_prompt()``: learn a soft prompt on a frozen (compressed) model.

Training minimises the next-token NLL of each window's real tokens -- the very function
(:func:`ctp.lm.token_nlls`) that scores evaluation, so the prompt is never credited for
predicting a window's first token or its own positions. The prompt with the best validation
perplexity is kept; the validation split is never the test split, and validation computes
exactly what ``ctp eval --prompt`` computes (same function, no autocast).

The frozen model stays in eval mode (no dropout) unless ``config.dropout`` asks otherwise;
gradient checkpointing recomputes each decoder layer in the backward pass (on by default on a GPU).
"""

from __future__ import annotations

import contextlib
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
from ..artifacts import atomic_dir, check_output_dir, find_checkpoint, read_compression_meta, write_prompt_folder
from ..config import PromptConfig, to_dict
from ..data import SOURCE_NAMES, load_text, source_label, tokenize
from ..errors import CTPError
from ..lm import input_device, model_context, spread_windows, token_nlls, window_nlls, windows_of
from ..models import checkpoint_layers, load_any, load_tokenizer, tokenizer_fingerprint, weights_fingerprint
from ..plots import plot_training_curve
from ..runtime import autocast_for, disable_cpu_packing_, resolve_device
from .state import Processes, TrainState, init_prompt, run_settings, work_dir

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


@dataclass
class _Data:
    """Training windows ``[count, seqlen]``, validation windows, and where they came from."""

    chunks: torch.Tensor
    val_windows: torch.Tensor
    seqlen: int
    train_tokens: int
    val_tokens: int
    given: bool  # token ids handed in, not text sources


def _check_output(out: str | os.PathLike | None, resume: bool, overwrite: bool, main: bool) -> Path | None:
    """Refuse what would lose work; return the checkpoint folder ``OUT.work`` (None: no output)."""
    if out is None:
        if resume:
            raise CTPError("resume needs an output folder")
        return None
    check_output_dir(out, overwrite)
    work = work_dir(out)
    has_checkpoint = find_checkpoint(work) is not None
    if overwrite and not resume and has_checkpoint and main:
        shutil.rmtree(work, ignore_errors=True)  # --overwrite starts over
        has_checkpoint = False
    if resume and not has_checkpoint:
        raise CTPError(f"--resume: no checkpoint to resume in {work}")
    if has_checkpoint and not resume and not overwrite:
        raise CTPError(f"{work} holds a checkpoint of an interrupted run: pass --resume to "
                       "continue it or --overwrite to start over")
    return work


def training_text(config: PromptConfig) -> tuple[str, str]:
    """(train text, validation text) for the config's sources, each joined as its corpus is."""
    limit = config.max_train_documents or (PAPER_C4_DOCUMENTS if config.data == "c4" else None)
    train = load_text(config.data, "train", max_documents=limit)
    if config.val_data is not None:
        return train, load_text(config.val_data, "validation")
    if config.data in SOURCE_NAMES:
        return train, load_text(config.data, "validation")
    raise CTPError(f"--data {config.data} is a file: give a separate --val-data file for "
                   "checkpoint selection")


def _prepare_data(config: PromptConfig, model: nn.Module, tokenizer: Any,
                  train_ids: torch.Tensor | None, val_ids: torch.Tensor | None) -> _Data:
    """Window length (checked against the context) and the tokenized windows."""
    n, context = config.num_virtual_tokens, model_context(model)
    if context is not None and n >= context:
        raise CTPError(f"num_virtual_tokens {n} must be below the model's context of {context}")
    if config.seqlen is not None:
        seqlen = config.seqlen
        if context is not None and seqlen + n > context:
            raise CTPError(f"seqlen {seqlen} plus {n} virtual tokens exceeds the model's context "
                           f"of {context}")
    else:
        seqlen = min(DEFAULT_SEQLEN, (context - n) if context else DEFAULT_SEQLEN)
    given = train_ids is not None and val_ids is not None
    if not given:
        if tokenizer is None:
            raise CTPError("tune_prompt needs a tokenizer, or train_ids and val_ids")
        train_text, val_text = training_text(config)
        train_ids = tokenize(tokenizer, train_text) if train_ids is None else train_ids
        val_ids = tokenize(tokenizer, val_text) if val_ids is None else val_ids
    if train_ids.numel() < seqlen:
        raise CTPError(f"the training text has {train_ids.numel()} tokens, fewer than one window of {seqlen}")
    if val_ids.numel() < seqlen:
        raise CTPError(f"the validation split is empty: {val_ids.numel()} tokens, fewer than one "
                       f"window of {seqlen}")
    return _Data(windows_of(train_ids, seqlen), spread_windows(val_ids, seqlen, config.eval_windows),
                 seqlen, int(train_ids.numel()), int(val_ids.numel()), given)


def _model_record(model_dir: str | None, model: nn.Module) -> dict[str, Any]:
    """What the prompt records about the model it was tuned on (and resume identity)."""
    record: dict[str, Any] = {"model": model_dir, "compression": None, "base_model": None}
    meta = read_compression_meta(model_dir) if model_dir and Path(model_dir).is_dir() else None
    if meta is not None:
        record.update(base_fingerprint=meta["base_fingerprint"], base_model=meta["base_model"],
                      compression=meta["compression"], compression_label=meta["label"])
    elif not any(hasattr(p, "quant_state") for p in model.parameters()):
        record.update(base_fingerprint=weights_fingerprint(model), base_model=model_dir,
                      compression_label="dense")
    else:
        record["base_fingerprint"] = None
    return record


def _validate(model: nn.Module, windows: torch.Tensor, prompt: torch.Tensor | None,
              batch_size: int, procs: Processes) -> float:
    """Validation perplexity over every process's share of ``windows`` -- the same function and
    precision as ``ctp eval`` (no autocast), so ``best_val_ppl`` reproduces."""
    shard = windows[procs.rank :: procs.world]
    nll = window_nlls(model, shard, prompt, batch_size) if shard.numel() else torch.zeros(0)
    total = procs.sum_(torch.tensor([nll.sum().item(), float(nll.numel())], dtype=torch.float64))
    value = total[0].item() / total[1].item()
    if not math.isfinite(value):
        raise CTPError(f"validation loss is not finite ({value}) "
                       f"{'without' if prompt is None else 'with'} the prompt: the model or the "
                       "prompt produces NaN or infinity")
    return math.exp(value)


def _train(model: nn.Module, state: TrainState, data: _Data, config: PromptConfig, steps: int,
           procs: Processes, work: Path | None, progress: bool) -> dict[str, float]:
    """The optimisation loop from ``state.step`` to ``steps``; returns token and time counts."""
    device, per_step = state.prompt.device, config.batch_size * config.grad_accum * procs.world
    autocast = autocast_for(config.precision, device)
    orders: dict[int, torch.Tensor] = {}

    def sample(global_index: int) -> torch.Tensor:
        epoch, pos = divmod(global_index, data.chunks.shape[0])
        if epoch not in orders:
            orders.clear()
            orders[epoch] = torch.randperm(data.chunks.shape[0], generator=torch.Generator().manual_seed(
                config.seed * 1_000_003 + epoch))
        return data.chunks[orders[epoch][pos]]

    bar = tqdm(range(state.step, steps), desc="tune-prompt", disable=not (progress and procs.main),
               initial=state.step, total=steps)
    started, tokens, eval_seconds = time.time(), 0, 0.0
    for step in bar:
        loss_sum = torch.zeros((), dtype=torch.float64)
        model.train(config.dropout)
        for micro in range(config.grad_accum):
            base = step * per_step + (micro * procs.world + procs.rank) * config.batch_size
            batch = torch.stack([sample(base + j) for j in range(config.batch_size)]).to(device)
            with autocast:
                loss = token_nlls(model, batch, state.prompt).mean()
            (loss / config.grad_accum).backward()
            loss_sum += loss.detach().double().cpu()
            tokens += batch.numel()
        model.eval()
        train_loss = procs.mean_(loss_sum / config.grad_accum).item()
        if not math.isfinite(train_loss):
            last = find_checkpoint(work) if work is not None else None
            raise CTPError(f"the training loss became non-finite ({train_loss}) at step {step + 1}; "
                           + (f"the last good checkpoint is in {last}: --resume with a lower --lr"
                              if last else "no checkpoint was written yet: retry with a lower --lr"))
        procs.mean_(state.prompt.grad)
        if step == state.step and not state.prompt.grad.any():
            raise CTPError("the prompt's gradient is exactly zero: the model does not pass "
                           "gradients back to its input embeddings")
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([state.prompt], config.grad_clip)
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step = done = step + 1
        state.history["step"].append(done)
        state.history["train_loss"].append(train_loss)
        postfix = {"loss": f"{train_loss:.4f}", "best val ppl": f"{state.best['val_ppl']:.3f}"}
        if done % config.eval_every == 0 or done == steps:
            eval_started = time.time()
            val_ppl = _validate(model, data.val_windows, state.prompt.detach(), config.batch_size, procs)
            eval_seconds += time.time() - eval_started
            state.history["eval_step"].append(done)
            state.history["val_ppl"].append(val_ppl)
            if val_ppl < state.best["val_ppl"]:
                state.best = {"val_ppl": val_ppl, "step": done}
                state.best_prompt = state.prompt.detach().clone()
            postfix["val ppl"] = f"{val_ppl:.3f}"
        bar.set_postfix(postfix, refresh=False)
        if work is not None and done % config.save_every == 0 and done < steps:
            if procs.main:
                state.save(work / "checkpoint")
            procs.barrier()
    bar.close()
    return {"tokens": tokens * procs.world, "seconds": time.time() - started - eval_seconds}


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
        model: a compressed or dense checkpoint folder / hub id / named model, or a loaded model
            (its parameters are frozen).
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
    procs = Processes(resolve_device(config.device))
    work = _check_output(out, resume, overwrite, procs.main)
    model_dir = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
    if isinstance(model, str):
        loaded = load_any(model, device=procs.device)
        tokenizer = tokenizer or load_tokenizer(model)
        model = loaded
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    disable_cpu_packing_(model)
    record = _model_record(None if model_dir is None else str(model_dir), model)  # before the data:
    data = _prepare_data(config, model, tokenizer, train_ids, val_ids)  # a damaged file fails fast
    per_step = config.batch_size * config.grad_accum * procs.world
    steps = config.steps or (math.ceil(config.epochs * data.chunks.shape[0] / per_step) if config.epochs
                             else PAPER_STEPS)
    warmup = config.warmup_steps if config.warmup_steps is not None else min(500, steps // 10)
    embed = model.get_input_embeddings().weight
    settings = {"config": run_settings(config), "steps": steps, "world": procs.world,
                "train_tokens": data.train_tokens, "val_tokens": data.val_tokens,
                "hidden": embed.shape[1], "model": str(model_dir),
                "model_identity": [record.get("base_fingerprint"), record.get("compression")]}
    state = TrainState.new(init_prompt(config, embed, tokenizer).to(input_device(model)), config,
                           steps, warmup, settings)
    if resume:
        state.resume(work)
        log.info("resuming at step %d of %d", state.step, steps)
    else:
        state.history["val_ppl_without_prompt"] = _validate(model, data.val_windows, None,
                                                            config.batch_size, procs)
        first = _validate(model, data.val_windows, state.prompt.detach(), config.batch_size, procs)
        state.history["eval_step"].append(0)
        state.history["val_ppl"].append(first)
        state.best = {"val_ppl": first, "step": 0}
    checkpointing = (config.gradient_checkpointing if config.gradient_checkpointing is not None
                     else input_device(model).type == "cuda")
    with checkpoint_layers(model) if checkpointing else contextlib.nullcontext():
        counts = _train(model, state, data, config, steps, procs, work, progress)
    meta = _prompt_meta(config, record, tokenizer, state, data, steps, warmup, procs, counts,
                        checkpointing, started)
    best = state.best_prompt.detach().float().cpu()
    if out is not None and procs.main:
        with atomic_dir(out, overwrite=overwrite) as staging:
            config_obj = getattr(model, "config", None)
            write_prompt_folder(staging, best, str(model_dir),
                                getattr(config_obj, "num_hidden_layers", 0),
                                getattr(config_obj, "num_attention_heads", 0), meta)
            plot_training_curve(state.history, staging / "training_curve.png")
        shutil.rmtree(work, ignore_errors=True)
    procs.barrier()
    return TuneResult(prompt=best, meta=meta, out=Path(out) if out is not None else None)


def _prompt_meta(config: PromptConfig, record: dict[str, Any], tokenizer: Any, state: TrainState,
                 data: _Data, steps: int, warmup: int, procs: Processes, counts: dict[str, float],
                 checkpointing: bool, started: float) -> dict[str, Any]:
    """``ctp_prompt.json``: what the prompt was trained on and how it did."""
    baseline = state.history.get("val_ppl_without_prompt")
    if baseline is not None and state.best["val_ppl"] >= baseline:
        log.warning("the best prompt (validation ppl %.4f) does not beat the model without a "
                    "prompt (%.4f): it will not help", state.best["val_ppl"], baseline)
    return {
        "ctp_version": __version__,
        **record,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "hidden_size": int(state.prompt.shape[1]),
        "num_virtual_tokens": int(state.prompt.shape[0]),
        "prompt_config": to_dict(config),
        "seqlen": data.seqlen,
        "steps": steps,
        "warmup_steps": warmup,
        "processes": procs.world,
        "global_batch": config.batch_size * config.grad_accum * procs.world,
        "gradient_checkpointing": checkpointing,
        "training_data": {"source": "tensor" if data.given else source_label(config.data),
                          "tokens": data.train_tokens, "windows": int(data.chunks.shape[0])},
        "validation_data": {"source": "tensor" if data.given else source_label(config.val_data or config.data),
                            "split": "validation", "windows": int(data.val_windows.shape[0])},
        "val_ppl_without_prompt": baseline,
        "best_val_ppl": state.best["val_ppl"],
        "best_step": state.best["step"],
        "history": state.history,
        "train_seconds_this_run": round(counts["seconds"], 2),
        "train_tokens_per_second_this_run": round(counts["tokens"] / max(counts["seconds"], 1e-9), 1),
        "seconds": round(time.time() - started, 2),
    }
