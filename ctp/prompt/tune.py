"""``tune_prompt()``: learn a soft prompt on a frozen (compressed) model, or on several
compressed copies of one base at once.

The prompt is an input prompt or a key/value prompt (:mod:`ctp.prompt.kinds`); training
minimises the objective (:mod:`ctp.prompt.objective`): the next-token NLL of each window's real
tokens -- the very targets :func:`ctp.lm.token_nlls` scores in evaluation, so the prompt is never
credited for predicting a window's first token or its own positions -- or the distillation KL
from the dense base, or a mix. The prompt with the best validation perplexity is kept (the
number users read, whatever the objective); the validation split is never the test split, and
validation computes exactly what ``ctp eval --prompt`` computes (same function, no autocast).

Several targets (``--targets A,B``): the copies must share a tokenizer and a base model; each
micro-batch's windows are split evenly among them (every step sees every copy), the step's loss
is the mean of the copies' losses, and validation is the mean over the copies of their
validation NLLs (the geometric mean of their perplexities).

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
from ..artifacts import atomic_dir, check_output_dir, find_checkpoint, read_compression_meta
from ..config import PromptConfig, to_dict
from ..data import SOURCE_NAMES, load_text, source_label, tokenize
from ..errors import CTPError
from ..lm import bos_token, input_device, model_context, spread_windows, window_nlls, windows_of
from ..models import (check_supported, check_weight_files, checkpoint_layers, load_any, load_tokenizer,
                      resolve_model, tokenizer_fingerprint, weights_fingerprint)
from ..plots import plot_training_curve
from ..runtime import autocast_for, disable_cpu_packing_, resolve_device
from .kinds import SoftPrompt, context_of, initial_prompt
from .objective import Objective, Teacher, TeacherCache
from .state import Processes, TrainState, init_prompt, run_settings, work_dir

log = logging.getLogger(__name__)

PAPER_STEPS = 30000
PAPER_C4_DOCUMENTS = 5000
DEFAULT_SEQLEN = 1024


@dataclass
class TuneResult:
    """The learned prompt's tensor (the best by validation: ``[n, hidden]`` for an input prompt,
    ``[n, layers x 2 x kv_heads x head_dim]`` for a key/value prompt), the prompt itself
    (:class:`~ctp.prompt.kinds.SoftPrompt`), its metadata, its folder."""

    prompt: torch.Tensor
    meta: dict[str, Any]
    out: Path | None
    soft_prompt: SoftPrompt | None = None


@dataclass
class _Copy:
    """One model the prompt is trained on, what the prompt records about it, and its BOS."""

    model: nn.Module
    name: str | None
    record: dict[str, Any]
    bos: int | None


@dataclass
class _Data:
    """Training windows ``[count, seqlen]``, validation windows, and where they came from."""

    chunks: torch.Tensor
    val_windows: torch.Tensor
    seqlen: int
    train_tokens: int
    val_tokens: int
    given: bool  # token ids handed in, not text sources
    train_ids: torch.Tensor | None = None  # the 1-D training ids the chunks were cut from


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


def _prepare_data(config: PromptConfig, model_config: Any, tokenizer: Any, bos: int | None,
                  train_ids: torch.Tensor | None, val_ids: torch.Tensor | None) -> _Data:
    """Window length (checked against the context of the model ``model_config`` describes, with
    BOS before the prompt) and the tokenized windows."""
    n, context = config.num_virtual_tokens + int(bos is not None), model_context(model_config)
    if context is not None and n >= context:
        raise CTPError(f"num_virtual_tokens {config.num_virtual_tokens} must be below the model's "
                       f"context of {context}")
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
        train_ids = tokenize(tokenizer, train_text, bos) if train_ids is None else train_ids
        val_ids = tokenize(tokenizer, val_text, bos) if val_ids is None else val_ids
    if train_ids.numel() < seqlen:
        raise CTPError(f"the training text has {train_ids.numel()} tokens, fewer than one window of {seqlen}")
    if val_ids.numel() < seqlen:
        raise CTPError(f"the validation split is empty: {val_ids.numel()} tokens, fewer than one "
                       f"window of {seqlen}")
    return _Data(windows_of(train_ids, seqlen), spread_windows(val_ids, seqlen, config.eval_windows),
                 seqlen, int(train_ids.numel()), int(val_ids.numel()), given, train_ids)


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


def _load_copies(models: list[str | nn.Module], config: PromptConfig, device: torch.device,
                 tokenizer: Any) -> tuple[list[_Copy], Any]:
    """Load every target (folders) or take them (models), frozen; check that several share a
    tokenizer and a base model. Returns the copies and the tokenizer."""
    copies, fingerprints = [], set()
    for i, model in enumerate(models):
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
        if isinstance(model, str):
            loaded = load_any(model, device=device)
            if i and tokenizer_fingerprint(load_tokenizer(model)) != tokenizer_fingerprint(tokenizer):
                raise CTPError(f"the targets do not share a tokenizer: {model} has another one "
                               f"than {models[0]}")
            tokenizer = tokenizer or load_tokenizer(model)
            model = loaded
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        disable_cpu_packing_(model)
        record = _model_record(None if name is None else str(name), model)
        fingerprints.add(record.get("base_fingerprint"))
        copies.append(_Copy(model, None if name is None else str(name), record,
                            bos_token(config.bos, model.config, tokenizer)))
    if len(copies) > 1 and (len(fingerprints) != 1 or None in fingerprints):
        raise CTPError("the targets are not compressed copies of one base model (their base "
                       "fingerprints differ or are unknown): a prompt for several copies needs one base")
    return copies, tokenizer


def _dense_base(config: PromptConfig, copy: _Copy, device: torch.device) -> tuple[nn.Module, str]:
    """The teacher / kv init model: ``config.teacher``, else the dense base the target's
    ``ctp_compression.json`` names, else the target itself when it is dense."""
    name = config.teacher or copy.record.get("base_model")
    if copy.record.get("compression_label") == "dense" and config.teacher is None:
        if config.objective != "nll":
            raise CTPError(f"--objective {config.objective} distils the dense base into a compressed "
                           "copy, and this target is the dense model itself (it would teach itself "
                           "nothing): use --objective nll, or name another --teacher")
        return copy.model, str(copy.name)
    if not name:
        raise CTPError("no dense base is known for this target (it has no ctp_compression.json): "
                       "name the teacher with --teacher, or use --objective nll"
                       + (" --init-model target" if config.prompt_type == "kv" and config.init_model == "dense"
                          else ""))
    if not Path(resolve_model(name)).exists() and ("/" in name and Path(name).is_absolute()):
        raise CTPError(f"the dense base {name} recorded in the target's metadata is not on this "
                       "machine: give --teacher")
    model = load_any(name, device=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, name


def _validate(copies: list[_Copy], windows: torch.Tensor, prompt: SoftPrompt | None,
              batch_size: int, procs: Processes) -> float:
    """Validation perplexity over every process's share of ``windows``: per copy the same
    function and precision as ``ctp eval`` (no autocast), so ``best_val_ppl`` reproduces;
    several copies: the exponent of the mean of their mean NLLs."""
    shard = windows[procs.rank :: procs.world]
    nlls = []
    for copy in copies:
        context = context_of(copy.model, prompt, copy.bos)
        nll = window_nlls(copy.model, shard, context, batch_size) if shard.numel() else torch.zeros(0)
        total = procs.sum_(torch.tensor([nll.sum().item(), float(nll.numel())], dtype=torch.float64))
        nlls.append(total[0].item() / total[1].item())
    value = sum(nlls) / len(nlls)
    if not math.isfinite(value):
        raise CTPError(f"validation loss is not finite ({value}) "
                       f"{'without' if prompt is None else 'with'} the prompt: the model or the "
                       "prompt produces NaN or infinity")
    return math.exp(value)


def _train(copies: list[_Copy], objective: Objective, template: SoftPrompt, state: TrainState,
           data: _Data, config: PromptConfig, steps: int, procs: Processes, work: Path | None,
           progress: bool) -> dict[str, float]:
    """The optimisation loop from ``state.step`` to ``steps``; returns token and time counts."""
    device, per_step = state.prompt.device, config.batch_size * config.grad_accum * procs.world
    autocast = autocast_for(config.precision, device)
    orders: dict[int, torch.Tensor] = {}
    share = config.batch_size // len(copies)

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
        for copy in copies:
            copy.model.train(config.dropout)
        prompt = template.with_tensor(state.value())
        for micro in range(config.grad_accum):
            base = step * per_step + (micro * procs.world + procs.rank) * config.batch_size
            batch = torch.stack([sample(base + j) for j in range(config.batch_size)]).to(device)
            for i, copy in enumerate(copies):
                with autocast:
                    loss = objective.loss(copy.model, batch[i * share:(i + 1) * share],
                                          prompt.cache(copy.model, copy.bos))
                (loss / (config.grad_accum * len(copies))).backward()
                loss_sum += loss.detach().double().cpu() / len(copies)
            tokens += batch.numel()
        for copy in copies:
            copy.model.eval()
        train_loss = procs.mean_(loss_sum / config.grad_accum).item()
        if not math.isfinite(train_loss):
            last = find_checkpoint(work) if work is not None else None
            raise CTPError(f"the training loss became non-finite ({train_loss}) at step {step + 1}; "
                           + (f"the last good checkpoint is in {last}: --resume with a lower --lr"
                              if last else "no checkpoint was written yet: retry with a lower --lr"))
        procs.mean_(state.prompt.grad)
        if step == state.step and not state.prompt.grad.any():
            raise CTPError("the prompt's gradient is exactly zero: the model does not pass "
                           "gradients back to the prompt")
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
            val_ppl = _validate(copies, data.val_windows, template.with_tensor(state.value().detach()),
                                config.batch_size, procs)
            eval_seconds += time.time() - eval_started
            state.history["eval_step"].append(done)
            state.history["val_ppl"].append(val_ppl)
            if val_ppl < state.best["val_ppl"]:
                state.best = {"val_ppl": val_ppl, "step": done}
                state.best_prompt = state.value().detach().clone()
            postfix["val ppl"] = f"{val_ppl:.3f}"
        bar.set_postfix(postfix, refresh=False)
        if work is not None and done % config.save_every == 0 and done < steps:
            if procs.main:
                state.save(work / "checkpoint")
            procs.barrier()
    bar.close()
    return {"tokens": tokens * procs.world, "seconds": time.time() - started - eval_seconds}


def tune_prompt(
    model: str | nn.Module | list[str | nn.Module],
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
            (its parameters are frozen); or a list of them: one prompt trained on several
            compressed copies of one base (see the module docstring).
        config: prompt kind and length, objective, data, optimisation (defaults: the paper's).
        out: the prompt folder to write (atomically); checkpoints go to ``OUT.work`` meanwhile.
        train_ids, val_ids: ready 1-D token ids instead of ``config.data``'s text.
        resume: continue from the checkpoint in ``OUT.work`` (same settings required).
    Returns:
        the best prompt's tensor (float32, CPU), the prompt, the metadata written to
        ``ctp_prompt.json``, and the output folder.
    """
    config = config or PromptConfig()
    started = time.time()
    procs = Processes(resolve_device(config.device))
    work = _check_output(out, resume, overwrite, procs.main)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise CTPError("give at least one model to tune the prompt on")
    if config.batch_size % len(models):
        raise CTPError(f"batch_size {config.batch_size} must be a multiple of the number of targets "
                       f"({len(models)}): each micro-batch is split evenly among them")
    for name in models:  # damaged weights fail here, not after the text is tokenized
        if isinstance(name, str):
            check_weight_files(name)
    # the text is tokenized before any model is loaded: a fast tokenizer's peak memory over a
    # long training text (1.9 GB for the embedded split with Gemma's) never adds to the model's
    if isinstance(models[0], str):
        model_config = check_supported(models[0])
        tokenizer = tokenizer or load_tokenizer(models[0])
    else:
        model_config = models[0].config
    data = _prepare_data(config, model_config, tokenizer, bos_token(config.bos, model_config, tokenizer),
                         train_ids, val_ids)
    copies, tokenizer = _load_copies(models, config, procs.device, tokenizer)
    first = copies[0]
    teacher, init_model = None, first.model
    if config.objective != "nll" or (config.prompt_type == "kv" and config.init_model == "dense"):
        dense, dense_name = _dense_base(config, first, procs.device)
        dense_bos = bos_token(config.bos, dense.config, tokenizer)
        if config.objective != "nll":
            cache = TeacherCache(config.teacher_cache, dense, dense_bos) if config.teacher_cache else None
            teacher = Teacher(dense, context_of(dense, None, dense_bos), dense_name, cache)
        if config.prompt_type == "kv" and config.init_model == "dense":
            init_model = dense
    objective = Objective(config.objective, config.kd_weight, teacher)
    per_step = config.batch_size * config.grad_accum * procs.world
    steps = (config.steps if config.steps is not None
             else math.ceil(config.epochs * data.chunks.shape[0] / per_step) if config.epochs
             else PAPER_STEPS)
    warmup = config.warmup_steps if config.warmup_steps is not None else min(500, steps // 10)
    embed = init_model.get_input_embeddings().weight
    start = initial_prompt(config.prompt_type, init_prompt(config, embed, tokenizer, data.train_ids),
                           first.model, init_model, first.bos)
    settings = {"config": run_settings(config), "steps": steps, "world": procs.world,
                "train_tokens": data.train_tokens, "val_tokens": data.val_tokens,
                "width": int(start.tensor.shape[1]),
                "models": [c.name for c in copies],
                "model_identity": [[c.record.get("base_fingerprint"), c.record.get("compression")]
                                   for c in copies],
                "teacher": None if teacher is None else teacher.name}
    state = TrainState.new(start.tensor.to(input_device(first.model)), config, steps, warmup, settings,
                           scale=start.part_rms() if config.lr_scale == "part-rms" else None)
    if resume:
        state.resume(work)
        log.info("resuming at step %d of %d", state.step, steps)
    else:
        state.history["val_ppl_without_prompt"] = _validate(copies, data.val_windows, None,
                                                            config.batch_size, procs)
        first_ppl = _validate(copies, data.val_windows, start, config.batch_size, procs)
        state.history["eval_step"].append(0)
        state.history["val_ppl"].append(first_ppl)
        state.best = {"val_ppl": first_ppl, "step": 0}
    checkpointing = (config.gradient_checkpointing if config.gradient_checkpointing is not None
                     else input_device(first.model).type == "cuda")
    with contextlib.ExitStack() as stack:
        if checkpointing:
            for copy in copies:
                stack.enter_context(checkpoint_layers(copy.model))
        counts = _train(copies, objective, start, state, data, config, steps, procs, work, progress)
    meta = _prompt_meta(config, copies, teacher, tokenizer, state, start, data, steps, warmup, procs,
                        counts, checkpointing, started)
    best = state.best_prompt.detach().float().cpu()
    soft = start.with_tensor(best)
    if out is not None and procs.main:
        with atomic_dir(out, overwrite=overwrite) as staging:
            soft.save(staging, first.model.config, str(first.name), meta)
            plot_training_curve(state.history, staging / "training_curve.png")
        shutil.rmtree(work, ignore_errors=True)
    procs.barrier()
    return TuneResult(prompt=best, meta=meta, out=Path(out) if out is not None else None,
                      soft_prompt=soft)


def _prompt_meta(config: PromptConfig, copies: list[_Copy], teacher: Teacher | None, tokenizer: Any,
                 state: TrainState, start: SoftPrompt, data: _Data, steps: int, warmup: int,
                 procs: Processes, counts: dict[str, float], checkpointing: bool,
                 started: float) -> dict[str, Any]:
    """``ctp_prompt.json``: what the prompt was trained on and how it did."""
    baseline = state.history.get("val_ppl_without_prompt")
    if baseline is not None and state.best["val_ppl"] >= baseline:
        log.warning("the best prompt (validation ppl %.4f) does not beat the model without a "
                    "prompt (%.4f): it will not help", state.best["val_ppl"], baseline)
    record = dict(copies[0].record)
    if len(copies) > 1:
        record["compression_label"] = " & ".join(str(c.record.get("compression_label")) for c in copies)
        record["targets"] = [c.record for c in copies]
    return {
        "ctp_version": __version__,
        **record,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "hidden_size": int(copies[0].model.get_input_embeddings().weight.shape[1]),
        "num_virtual_tokens": start.num_virtual_tokens,
        **start.record(),
        "objective": config.objective,
        "teacher": None if teacher is None else teacher.name,
        **({"teacher_cache_batches": {"read": teacher.cache.hits, "computed": teacher.cache.misses}}
           if teacher is not None and teacher.cache is not None else {}),
        "bos_token_id": copies[0].bos,
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
