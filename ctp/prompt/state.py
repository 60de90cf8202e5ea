"""The state of a prompt-tuning run: initialisation, schedule, processes, checkpoints and resume.

Runs resume exactly: the data order is a pure function of (seed, epoch), and a checkpoint holds
the prompt, AdamW moments, scheduler state, step, history and best prompt. Under ``accelerate
launch`` (or torchrun) each process takes its share of every global batch and only the prompt's
gradient is averaged across processes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts import (find_checkpoint, load_checkpoint, optimizer_from_checkpoint,
                         optimizer_to_checkpoint, read_checkpoint_settings, save_checkpoint)
from ..config import PromptConfig, to_dict
from ..errors import CTPError


class Processes:
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


def run_settings(config: PromptConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint (not how often it logs or saves,
    nor where or how memory-thriftily it runs, nor where it keeps the teacher's cache)."""
    settings = to_dict(config)
    for key in ("save_every", "device", "gradient_checkpointing", "teacher_cache"):
        settings.pop(key)
    return settings


def resumable(out: str | os.PathLike, config: PromptConfig) -> bool:
    """Whether ``OUT.work`` holds an interrupted run of the same prompt settings."""
    checkpoint = find_checkpoint(work_dir(out))
    if checkpoint is None:
        return False
    return read_checkpoint_settings(checkpoint).get("config") == run_settings(config)


def init_prompt(config: PromptConfig, embed: torch.Tensor, tokenizer: Any,
                train_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The starting embeddings ``[n, hidden]`` (float32, CPU) for ``config.init``, rows of
    ``embed`` (the vocabulary's embeddings) for every init but ``random``.

    ``window`` takes the first ``n`` tokens at a seeded offset of the 1-D training ids.
    """
    n, (vocab, hidden) = config.num_virtual_tokens, embed.shape
    gen = torch.Generator().manual_seed(config.seed)
    weight = embed.detach()
    if config.init == "vocab":
        rows = torch.arange(n) % vocab
    elif config.init == "sample-vocab":
        rows = torch.randint(0, vocab, (n,), generator=gen)
    elif config.init == "random":
        return torch.randn(n, hidden, generator=gen) * weight.float().std()
    elif config.init == "window":
        if train_ids is None or train_ids.numel() < n:
            raise CTPError(f"init window needs at least {n} training tokens")
        start = int(torch.randint(0, train_ids.numel() - n + 1, (1,), generator=gen))
        rows = train_ids[start:start + n].cpu()
    else:  # text:...
        if tokenizer is None:
            raise CTPError("init text:... needs the model's tokenizer")
        ids = tokenizer(config.init[len("text:"):], add_special_tokens=False)["input_ids"]
        if not ids:
            raise CTPError("the init text has no tokens")
        rows = torch.tensor(ids)[torch.arange(n) % len(ids)]
    return weight[rows.to(weight.device)].float().cpu().clone()


def lr_factor(schedule: str, steps: int, warmup: int):
    """The learning-rate multiplier at each step: linear warmup from ``1 / warmup`` (not from 0,
    as transformers' schedules start, which wastes the first step), then linear, cosine or
    constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


@dataclass
class TrainState:
    """Everything a run carries from step to step, and writes into a checkpoint.

    The optimiser works on ``prompt``; the prompt itself is ``prompt x scale`` (:meth:`value`):
    ``scale`` is 1 for absolute steps and each part's RMS at the start for ``lr_scale part-rms``,
    so Adam's steps of about ``lr`` become steps of ``lr`` times that part's scale."""

    prompt: nn.Parameter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    settings: dict[str, Any]
    history: dict[str, list] = field(default_factory=lambda: {
        "step": [], "train_loss": [], "eval_step": [], "val_ppl": []})
    best: dict[str, Any] = field(default_factory=lambda: {"val_ppl": math.inf, "step": 0})
    best_prompt: torch.Tensor | None = None
    step: int = 0
    scale: torch.Tensor | None = None  # None: 1

    @classmethod
    def new(cls, prompt: torch.Tensor, config: PromptConfig, steps: int, warmup: int,
            settings: dict[str, Any], scale: torch.Tensor | None = None) -> TrainState:
        """A fresh run from ``prompt`` (kept as a float32 parameter whatever the model's dtype),
        optimised as ``prompt / scale`` when a ``scale`` (``[1, width]``, positive) is given."""
        start = prompt.float()
        if scale is not None:
            scale = scale.float().clamp(min=1e-8).to(start.device)
        param = nn.Parameter(start if scale is None else start / scale)
        optimizer = torch.optim.AdamW([param], lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, steps, warmup))
        return cls(param, optimizer, scheduler, settings, best_prompt=start.detach().clone(), scale=scale)

    def value(self) -> torch.Tensor:
        """The prompt tensor now (differentiable with respect to :attr:`prompt`)."""
        return self.prompt if self.scale is None else self.prompt * self.scale

    def save(self, folder: Path) -> None:
        """Write a resumable checkpoint into ``folder`` (atomically)."""
        opt_tensors, opt_meta = optimizer_to_checkpoint(self.optimizer)
        save_checkpoint(folder, {"prompt": self.prompt, "best_prompt": self.best_prompt, **opt_tensors},
                        {"settings": self.settings, "step": self.step, "history": self.history,
                         "best": self.best, "optimizer": opt_meta,
                         "scheduler": self.scheduler.state_dict()})

    def resume(self, work: Path) -> None:
        """Continue from the checkpoint in ``work``; its settings must equal this run's."""
        folder = find_checkpoint(work)
        if folder is None:
            raise CTPError(f"--resume: no checkpoint to resume in {work}")
        tensors, state = load_checkpoint(folder)
        if state["settings"] != self.settings:
            diff = sorted(k for k in set(self.settings) | set(state["settings"])
                          if self.settings.get(k) != state["settings"].get(k))
            raise CTPError(f"--resume: the checkpoint in {work} was made with different settings "
                           f"({', '.join(diff)})")
        for name in ("prompt", "best_prompt"):
            if name not in tensors or tensors[name].shape != self.prompt.shape:
                raise CTPError(f"--resume: the checkpoint in {folder} has no valid {name}")
        with torch.no_grad():
            self.prompt.copy_(tensors["prompt"])
        self.best_prompt = tensors["best_prompt"].to(self.prompt.device)
        try:
            optimizer_from_checkpoint(self.optimizer, tensors, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CTPError(f"--resume: the optimizer state in {folder} is damaged ({exc})") from None
        self.step, self.history, self.best = state["step"], state["history"], state["best"]
