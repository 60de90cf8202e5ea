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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CTPError
from ..head import kl_fn, mixed_fn, nll_fn, output_head, per_token_losses
from ..lm import PromptCache, hidden_states


@dataclass
class Teacher:
    """The model distillation follows, and what stands before its windows (BOS or nothing)."""

    model: nn.Module
    context: PromptCache | None
    name: str


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
            with torch.no_grad():
                taught = hidden_states(teacher.model, batch.to(_device_of(teacher.model)),
                                       teacher.context)[:, :-1]
            parts.append((w_kd, kl_fn(head, output_head(teacher.model),
                                      taught.reshape(-1, taught.shape[-1]))))
        return per_token_losses(flat, mixed_fn(parts), head.chunk_tokens()).mean()


def _device_of(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device
