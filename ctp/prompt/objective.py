"""What prompt training minimises: a function of the student's predictions, the targets and the
teacher.

- ``nll``: the next-token NLL of each window's real tokens (the paper's loss; :func:`ctp.lm.token_nlls`
  scores exactly these targets in evaluation). It rewards adapting the model to the training
  text as much as undoing compression.
- ``kd``: the KL divergence from the teacher's next-token distribution (the dense base) to the
  prompted student's, at the same scored positions of the same windows; the teacher reads the
  windows without gradients (and without the prompt: "the dense model with a distillation prompt
  is the dense model"), each behind its own BOS per the rule. It rewards only the repair, and
  every compressed copy of one base aims at the same target.
- ``nll+kd``: ``(1 - w) x nll + w x kd``.

Losses are per token, averaged over every scored token of the batch, and go through the output
heads a chunk of tokens at a time (:mod:`ctp.head`): neither the student's nor the teacher's
logits ever exist whole.

The teacher's side of a window never changes (no prompt, no gradient), so a
:class:`TeacherCache` can keep what its layers compute -- the final hidden states, not the
logits -- for every window it has read; a later run on the same windows (another cell of a
study, another learning rate, another target of the same base) then runs only the teacher's
output head.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CTPError
from ..head import kl_fn, mixed_fn, nll_fn, output_head, per_token_losses
from ..lm import PromptCache, hidden_states
from ..models import weights_fingerprint

CACHE_FORMAT = 1  # bump when what a cache entry holds changes


class TeacherCache:
    """The teacher's final hidden states (what its output head reads, at the scored positions)
    of every window it has read, one safetensors file per window (in the dtype the teacher
    computes in), under a subfolder
    named by the teacher's identity: its weights' fingerprint, the dtype and kind of device it
    computes in, and the BOS id before its windows (None: none). A window's file is named by the
    sha256 of its token ids. Entries are written atomically; a damaged one is recomputed.

    A cached batch equals a computed one to within float32 rounding (the layers may have run
    with another batch composition when it was written), not to the bit."""

    def __init__(self, folder: str | os.PathLike, model: nn.Module, bos: int | None) -> None:
        weight = model.get_input_embeddings().weight
        identity = {"format": CACHE_FORMAT, "teacher": weights_fingerprint(model), "dtype": str(weight.dtype),
                    "device": weight.device.type, "bos": bos}
        self.folder = Path(folder) / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / "teacher.json"
        if not marker.exists():
            marker.write_text(json.dumps(identity, indent=1) + "\n")
        self.hits = self.misses = 0

    @staticmethod
    def _key(window: torch.Tensor) -> str:
        return hashlib.sha256(window.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()

    def get(self, batch: torch.Tensor) -> torch.Tensor | None:
        """The cached ``[batch, T - 1, hidden]`` for every window of ``batch``, or None if any
        window is missing."""
        rows = []
        for window in batch:
            path = self.folder / f"{self._key(window)}.safetensors"
            try:
                rows.append(load_file(path)["hidden"])
            except Exception:  # absent, or cut short by an interrupted write: computed again
                self.misses += 1
                return None
        self.hits += 1
        return torch.stack(rows)

    def put(self, batch: torch.Tensor, hidden: torch.Tensor) -> None:
        for window, row in zip(batch, hidden):
            path = self.folder / f"{self._key(window)}.safetensors"
            if path.exists():
                continue
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({"hidden": row.detach().cpu().contiguous()}, tmp)
            os.replace(tmp, path)


@dataclass
class Teacher:
    """The model distillation follows, what stands before its windows (BOS or nothing), and
    optionally a cache of what its layers compute."""

    model: nn.Module
    context: PromptCache | None
    name: str
    cache: TeacherCache | None = None

    def hidden(self, batch: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states at the scored positions, ``[batch, T - 1, hidden]``,
        without gradients."""
        if self.cache is not None:
            cached = self.cache.get(batch)
            if cached is not None:
                return cached.to(_device_of(self.model))
        with torch.no_grad():
            taught = hidden_states(self.model, batch.to(_device_of(self.model)), self.context)[:, :-1]
        if self.cache is not None:
            self.cache.put(batch, taught)
        return taught


@dataclass
class Objective:
    """``kind`` (nll, kd or nll+kd), the mix weight, and the teacher (for kd)."""

    kind: str
    kd_weight: float = 0.5
    teacher: Teacher | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("nll", "kd", "nll+kd"):
            raise CTPError(f"unknown objective {self.kind!r}; choose from nll, kd, nll+kd")
        if self.kind != "nll" and self.teacher is None:
            raise CTPError(f"objective {self.kind} needs a teacher model")

    @property
    def weights(self) -> tuple[float, float]:
        """(weight of nll, weight of kd)."""
        return {"nll": (1.0, 0.0), "kd": (0.0, 1.0),
                "nll+kd": (1.0 - self.kd_weight, self.kd_weight)}[self.kind]

    def loss(self, model: nn.Module, batch: torch.Tensor, context: PromptCache | None) -> torch.Tensor:
        """The mean per-token loss of ``batch`` ``[B, T]`` read by ``model`` after ``context``
        (a scalar, differentiable with respect to what the context was built from)."""
        hidden = hidden_states(model, batch, context)[:, :-1]
        flat = hidden.reshape(-1, hidden.shape[-1])
        head = output_head(model)
        w_nll, w_kd = self.weights
        parts = [(w_nll, nll_fn(head, batch[:, 1:].reshape(-1).to(flat.device)))]
        if w_kd:
            teacher = self.teacher
            taught = teacher.hidden(batch)
            parts.append((w_kd, kl_fn(head, output_head(teacher.model),
                                      taught.reshape(-1, taught.shape[-1]))))
        return per_token_losses(flat, mixed_fn(parts), head.chunk_tokens()).mean()


def _device_of(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device
