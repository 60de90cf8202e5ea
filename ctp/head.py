"""The output head, a chunk of tokens at a time: losses whose memory does not grow with the
vocabulary.

A ``[batch, seq, vocab]`` float32 logits tensor is 2.1 GB for 8 x 256 tokens of Gemma's 262,144
tokens, before its softmax and gradient. Every loss ctp computes (next-token NLL for training,
validation and evaluation; the distillation KL) goes through :func:`per_token_losses` instead:
the model runs up to its output head (:func:`final_hidden`), then the head and the loss run on a
chunk of tokens at a time. With gradients, each chunk's gradient with respect to its hidden
states is taken on the spot and only that (``[tokens, hidden]``) is kept for the backward pass,
so training costs the same arithmetic as the unchunked loss and holds one chunk's logits at a
time.

The head is the model's own output Linear followed by what its family does to the logits
(Gemma 2/3's soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``): read from the
config and checked once per model against the model's own forward (:func:`output_head`), so a
family with a head this module does not know is refused, never mis-scored.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CTPError

# float32 logits one chunk may hold: 32 MB is 32 tokens of Gemma's 262K vocabulary, 170 of
# SmolLM2's 49K; the softmax and its gradient add two more of the same size while a chunk runs.
CHUNK_BYTES = 32 * 2**20


class _Stop(Exception):
    """Raised by the capture hook once the output head's input is in hand."""


@dataclass(frozen=True, eq=False)
class Head:
    """``logits = transform(linear(hidden))``: the model's output head, applicable to any chunk."""

    linear: nn.Module
    softcap: float | None = None  # Gemma 2/3: cap * tanh(logits / cap)
    scale: float = 1.0  # Cohere: * logit_scale; Granite: / logits_scaling

    @property
    def vocab(self) -> int:
        return self.linear.out_features

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.linear.weight.device)
        logits = self.linear(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def chunk_tokens(self, budget: int | None = None) -> int:
        """Tokens per chunk so that one chunk's float32 logits fit in ``budget`` bytes (default
        :data:`CHUNK_BYTES`)."""
        return max(1, (CHUNK_BYTES if budget is None else budget) // (4 * self.vocab))


def _head_rules(config: Any) -> dict[str, Any]:
    """What the family does to its logits after the output Linear, read from its config."""
    rules: dict[str, Any] = {}
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        rules["softcap"] = float(cap)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite
        scale /= float(config.logits_scaling)
    if scale != 1.0:
        rules["scale"] = scale
    return rules


_HEADS: weakref.WeakKeyDictionary[nn.Module, Head] = weakref.WeakKeyDictionary()


def output_head(model: nn.Module) -> Head:
    """The model's output head, checked once against the model's own logits.

    The check runs the model on a few tokens and compares its logits with the head applied to
    the captured hidden states; a family whose head does something else is a CTPError.
    """
    head = _HEADS.get(model)
    if head is not None:
        return head
    linear = model.get_output_embeddings()
    if linear is None:
        raise CTPError(f"{type(model).__name__} has no output embeddings (not a causal LM head)")
    head = Head(linear, **_head_rules(model.config))
    vocab = head.vocab
    device = model.get_input_embeddings().weight.device
    ids = (torch.arange(1, 9, device=device) * 7919 % vocab).unsqueeze(0)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = head(final_hidden(model, input_ids=ids, use_cache=False)).float().to(want.device)
    finite = want[torch.isfinite(want)]  # a damaged model's NaN is reported where it is scored
    scale = finite.abs().max().clamp(min=1e-6) if finite.numel() else torch.tensor(1.0)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=0.0, atol=1e-4 * float(scale),
                                                     equal_nan=True):
        raise CTPError(f"ctp cannot reproduce the output head of {model.config.model_type} models "
                       "(its logits are transformed in a way ctp does not know); unsupported")
    _HEADS[model] = head
    return head


def final_hidden(model: nn.Module, **forward_kwargs: Any) -> torch.Tensor:
    """What the model's output head receives for ``model(**forward_kwargs)``: ``[batch, T,
    hidden]``, with the graph to whatever requires gradients. The head itself never runs."""
    seen: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple) -> None:
        seen["hidden"] = args[0]
        raise _Stop

    handle = model.get_output_embeddings().register_forward_pre_hook(capture)
    try:
        model(**forward_kwargs, logits_to_keep=0)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise CTPError(f"{type(model).__name__}'s forward never reached its output head")
    return seen["hidden"]


LossFn = Callable[[torch.Tensor, slice], torch.Tensor]


class _ChunkedLoss(torch.autograd.Function):
    """Per-token losses of ``hidden`` ``[N, H]``, chunk by chunk; each chunk's gradient with
    respect to its hidden states is taken in the forward pass (``loss_t`` depends on ``h_t``
    alone, so ``d loss_t / d h_t`` serves any weighting the caller applies afterwards)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, fn: LossFn, chunk: int) -> torch.Tensor:
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grads = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(True)
                loss = fn(h, rows)
                (grads[rows],) = torch.autograd.grad(loss.sum(), h)
            losses[rows] = loss.detach().to(losses.device)
        ctx.save_for_backward(grads)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grads,) = ctx.saved_tensors
        return grads * grad_losses.to(grads.dtype).unsqueeze(-1), None, None


def per_token_losses(hidden: torch.Tensor, fn: LossFn, chunk: int) -> torch.Tensor:
    """``fn(hidden[rows], rows)`` for consecutive chunks of ``chunk`` rows of ``hidden``
    ``[N, H]``, as one float32 ``[N]``; differentiable with respect to ``hidden`` (holding one
    chunk's logits at a time), and without building any graph when nothing needs gradients."""
    if hidden.requires_grad and torch.is_grad_enabled():
        return _ChunkedLoss.apply(hidden, fn, chunk)
    with torch.no_grad():
        out = [fn(hidden[rows], rows).float() for rows in
               (slice(s, s + chunk) for s in range(0, hidden.shape[0], chunk))]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def nll_fn(head: Head, targets: torch.Tensor) -> LossFn:
    """Next-token NLL (float32) of ``targets`` ``[N]`` under ``head``'s logits of each row."""

    def fn(hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        logits = head(hidden).float()
        return F.cross_entropy(logits, targets[rows].to(logits.device), reduction="none")

    return fn


class _KLFromLogits(torch.autograd.Function):
    """``KL(p || softmax(logits))`` per row from the teacher's log-probabilities ``log p``, its
    gradient with respect to the logits (``softmax(logits) - p``) formed in the same pass: fewer
    sweeps over a ``[tokens, vocab]`` chunk than autograd through a soft-target cross-entropy."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        probs = teacher_logp.exp()
        kl = torch.sub(teacher_logp, logp).mul_(probs).sum(dim=-1)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logp.exp_().sub_(probs))
        return kl

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (diff,) = ctx.saved_tensors
        return diff * grad.unsqueeze(-1), None


def kl_fn(head: Head, teacher_head: Head, teacher_hidden: torch.Tensor) -> LossFn:
    """``KL(teacher || student)`` per row, in nats: the teacher's next-token distribution (its
    head on ``teacher_hidden`` ``[N, H_teacher]``, no gradient) against the student's."""

    def fn(hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        logits = head(hidden).float()
        with torch.no_grad():
            teacher = F.log_softmax(teacher_head(teacher_hidden[rows]).float(), dim=-1).to(logits.device)
        return _KLFromLogits.apply(logits, teacher)

    return fn


def mixed_fn(parts: list[tuple[float, LossFn]]) -> LossFn:
    """``sum(weight * fn)`` over ``parts`` (weights of zero are skipped)."""
    kept = [(w, f) for w, f in parts if w]

    def fn(hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        return sum(w * f(hidden, rows) for w, f in kept)

    return fn
