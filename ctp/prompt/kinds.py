"""Soft prompts: two kinds behind one interface.

A prompt is keys and values that stand before the text in every layer (after BOS, when the rule
puts one there). The two kinds differ only in where those come from:

- an **input** prompt is ``n`` embeddings ``[n, hidden]``; the model computes its keys and values
  by reading them (PEFT prompt tuning, the paper's prompt);
- a **key/value** prompt is the keys and values themselves, ``n`` per layer, learned directly
  (PEFT prefix tuning; P-tuning v2): one tensor ``[n, layers x 2 x kv_heads x head_dim]`` in
  PEFT's layout, row ``t`` holding, for each layer in turn, the key then the value of every
  key/value head.

Both are a 2-D tensor that is trained and saved as PEFT's ``prompt_embeddings``, and both give a
:class:`~ctp.lm.PromptCache` for a model (:meth:`SoftPrompt.cache`, differentiable with respect to
the tensor). Everything that takes a prompt -- training, evaluation, stitching, transfer, the
lm-eval plugin, generation, push -- goes through that interface.
"""

from __future__ import annotations

import os
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..artifacts import (ADAPTER_CONFIG, PREFIX_TUNING, load_prompt_embeddings, prompt_peft_type,
                         read_json, read_prompt_meta, write_adapter)
from ..errors import CTPError
from ..lm import PromptCache, cache_of_keys_values, context_cache


@dataclass(frozen=True)
class KVGeometry:
    """The shape of a model's keys and values: what a key/value prompt must match."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Values per virtual token: ``layers x 2 x kv_heads x head_dim``."""
        return self.layers * 2 * self.kv_heads * self.head_dim

    def describe(self) -> str:
        return f"{self.layers} layers x {self.kv_heads} key/value heads x head size {self.head_dim}"


_GEOMETRY: weakref.WeakKeyDictionary[nn.Module, KVGeometry] = weakref.WeakKeyDictionary()


def kv_geometry(model: nn.Module) -> KVGeometry:
    """The model's key/value shape, read from the keys it stores for one token (so head sizes
    that differ from ``hidden / heads``, as Gemma's, come out right)."""
    if model in _GEOMETRY:
        return _GEOMETRY[model]
    with torch.no_grad():
        probe = context_cache(model, None, 0)
    shapes = {tuple(k.shape[1::2]) for k in probe.keys} | {tuple(v.shape[1::2]) for v in probe.values}
    if len(shapes) != 1:
        raise CTPError(f"the layers of this {model.config.model_type} model store keys and values "
                       f"of different shapes {sorted(shapes)}; a key/value prompt needs one shape")
    (kv_heads, head_dim), = shapes
    geometry = KVGeometry(len(probe.keys), kv_heads, head_dim)
    _GEOMETRY[model] = geometry
    return geometry


class SoftPrompt(ABC):
    """A soft prompt of ``n`` virtual tokens: its tensor, and its keys and values in a model."""

    kind: ClassVar[str]

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.dim() != 2 or tensor.shape[0] == 0:
            raise CTPError(f"a prompt must be a non-empty 2-D tensor, got shape {tuple(tensor.shape)}")
        self.tensor = tensor

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.tensor.shape[0])

    @abstractmethod
    def cache(self, model: nn.Module, bos: int | None = None) -> PromptCache:
        """The prompt's keys and values in ``model`` after BOS (when ``bos`` is an id);
        differentiable with respect to :attr:`tensor` when grad mode is on."""

    @abstractmethod
    def mismatch(self, model: nn.Module) -> str | None:
        """Why this prompt cannot stand before ``model``'s text (None when it can)."""

    @abstractmethod
    def record(self) -> dict[str, Any]:
        """The fields ``ctp_prompt.json`` keeps about the prompt's kind and shape."""

    @abstractmethod
    def peft_config(self, model_config: Any, base_model: str) -> Any:
        """The PEFT adapter config that loads this prompt's tensor."""

    def part_rms(self) -> torch.Tensor:
        """The root mean square of each part of the prompt, broadcast to ``[1, width]``: one part
        here (the whole tensor); kinds with parts of their own say which."""
        return self.tensor.detach().float().pow(2).mean().sqrt().expand(1, self.tensor.shape[1])

    def with_tensor(self, tensor: torch.Tensor) -> SoftPrompt:
        """The same kind and shape of prompt holding ``tensor`` (e.g. a trainable parameter)."""
        return type(self)(tensor, **self._shape())

    def _shape(self) -> dict[str, Any]:
        return {}

    def save(self, folder: Path, model_config: Any, base_model: str, meta: dict[str, Any]) -> None:
        """Write the prompt as a PEFT adapter plus ``ctp_prompt.json`` (``meta`` and :meth:`record`)."""
        write_adapter(folder, self.tensor, self.peft_config(model_config, base_model),
                      {**meta, **self.record()})


class InputPrompt(SoftPrompt):
    """``n`` embeddings ``[n, hidden]`` before the text (PEFT prompt tuning)."""

    kind = "input"

    def cache(self, model: nn.Module, bos: int | None = None) -> PromptCache:
        reason = self.mismatch(model)
        if reason is not None:
            raise CTPError(reason)
        return context_cache(model, self.tensor, bos)

    def mismatch(self, model: nn.Module) -> str | None:
        width = model.get_input_embeddings().weight.shape[1]
        if self.tensor.shape[1] != width:
            return f"hidden size mismatch: the prompt has {self.tensor.shape[1]}, the model {width}"
        return None

    def record(self) -> dict[str, Any]:
        return {"prompt_type": self.kind, "hidden_size": int(self.tensor.shape[1])}

    def peft_config(self, model_config: Any, base_model: str) -> Any:
        from peft import PromptTuningConfig, TaskType

        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.num_virtual_tokens,
            token_dim=int(self.tensor.shape[1]), num_transformer_submodules=1,
            num_attention_heads=getattr(model_config, "num_attention_heads", 0),
            num_layers=getattr(model_config, "num_hidden_layers", 0), base_model_name_or_path=base_model)


class KVPrompt(SoftPrompt):
    """``n`` keys and values in every layer (PEFT prefix tuning), ``[n, layers x 2 x kv_heads x
    head_dim]``."""

    kind = "kv"

    def __init__(self, tensor: torch.Tensor, geometry: KVGeometry) -> None:
        super().__init__(tensor)
        if tensor.shape[1] != geometry.width:
            raise CTPError(f"a key/value prompt for {geometry.describe()} has {geometry.width} values "
                           f"per token, got {tensor.shape[1]}")
        self.geometry = geometry

    def _shape(self) -> dict[str, Any]:
        return {"geometry": self.geometry}

    def keys_values(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the keys and the values ``[kv_heads, n, head_dim]`` (views of the tensor)."""
        g = self.geometry
        grid = self.tensor.view(self.num_virtual_tokens, g.layers, 2, g.kv_heads, g.head_dim)
        keys = [grid[:, layer, 0].transpose(0, 1) for layer in range(g.layers)]
        values = [grid[:, layer, 1].transpose(0, 1) for layer in range(g.layers)]
        return keys, values

    def part_rms(self) -> torch.Tensor:
        """Per layer, the RMS of its keys and of its values, broadcast to ``[1, width]``."""
        g = self.geometry
        grid = self.tensor.detach().float().view(self.num_virtual_tokens, g.layers, 2, g.kv_heads * g.head_dim)
        rms = grid.pow(2).mean(dim=(0, 3), keepdim=True).sqrt()  # [1, layers, 2, 1]
        return rms.expand(1, g.layers, 2, g.kv_heads * g.head_dim).reshape(1, -1)

    @staticmethod
    def flatten(keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer keys and values ``[kv_heads, n, head_dim]`` as PEFT's ``[n, width]`` rows."""
        grid = torch.stack([torch.stack([k, v]) for k, v in zip(keys, values, strict=True)])
        n = grid.shape[3]  # grid: [layers, 2, kv_heads, n, head_dim]
        return grid.permute(3, 0, 1, 2, 4).reshape(n, -1)

    def cache(self, model: nn.Module, bos: int | None = None) -> PromptCache:
        reason = self.mismatch(model)
        if reason is not None:
            raise CTPError(reason)
        keys, values = self.keys_values()
        return cache_of_keys_values(model, keys, values, bos)

    def mismatch(self, model: nn.Module) -> str | None:
        have = kv_geometry(model)
        if have != self.geometry:
            return (f"key/value shape mismatch: the prompt has {self.geometry.describe()}, the model "
                    f"{have.describe()}")
        return None

    def record(self) -> dict[str, Any]:
        g = self.geometry
        return {"prompt_type": self.kind, "kv_layers": g.layers, "kv_heads": g.kv_heads,
                "head_dim": g.head_dim}

    def peft_config(self, model_config: Any, base_model: str) -> Any:
        from peft import PrefixTuningConfig, TaskType

        g = self.geometry
        return PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.num_virtual_tokens,
            token_dim=g.kv_heads * g.head_dim, num_layers=g.layers, num_attention_heads=g.kv_heads,
            encoder_hidden_size=g.kv_heads * g.head_dim, prefix_projection=False,
            num_transformer_submodules=1, base_model_name_or_path=base_model)


PROMPT_KINDS: dict[str, type[SoftPrompt]] = {"input": InputPrompt, "kv": KVPrompt}


def _folder_geometry(folder: Path, meta: dict[str, Any]) -> KVGeometry:
    """A key/value prompt folder's shape: from ``ctp_prompt.json``, else PEFT's adapter config."""
    if meta:
        return KVGeometry(meta["kv_layers"], meta["kv_heads"], meta["head_dim"])
    config = read_json(folder / ADAPTER_CONFIG)
    try:
        heads, token_dim = int(config["num_attention_heads"]), int(config["token_dim"])
        return KVGeometry(int(config["num_layers"]), heads, token_dim // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise CTPError(f"{folder / ADAPTER_CONFIG}: a prefix-tuning config needs num_layers, "
                       "num_attention_heads and token_dim") from None


def load_prompt(prompt: str | os.PathLike | torch.Tensor | SoftPrompt | None) -> SoftPrompt | None:
    """A prompt from a folder (either kind, checked), a tensor ``[n, hidden]`` (an input
    prompt), a :class:`SoftPrompt` (as it is) or None."""
    if prompt is None or isinstance(prompt, SoftPrompt):
        return prompt
    tensor = load_prompt_embeddings(prompt)
    if isinstance(prompt, torch.Tensor):
        return InputPrompt(tensor)
    folder = Path(prompt)
    meta = read_prompt_meta(folder)
    if prompt_peft_type(folder) == PREFIX_TUNING:
        if meta and meta.get("prompt_type") != "kv":
            raise CTPError(f"{folder}: a prefix-tuning adapter whose ctp_prompt.json says "
                           f"prompt_type {meta.get('prompt_type', 'input')!r}")
        return KVPrompt(tensor, _folder_geometry(folder, meta))
    if meta.get("prompt_type", "input") != "input":
        raise CTPError(f"{folder}: a prompt-tuning adapter whose ctp_prompt.json says prompt_type "
                       f"{meta['prompt_type']!r}")
    return InputPrompt(tensor)


def context_of(model: nn.Module, prompt: SoftPrompt | None, bos: int | None) -> PromptCache | None:
    """What stands before every window of ``model``'s text, as a cache built once without
    gradients: BOS (an id, or None), then the prompt (None: BOS alone, or nothing at all)."""
    with torch.no_grad():
        return context_cache(model, None, bos) if prompt is None else prompt.cache(model, bos)


def initial_prompt(kind: str, embeddings: torch.Tensor, model: nn.Module, init_model: nn.Module,
                   bos: int | None) -> SoftPrompt:
    """The prompt a run starts from, given the input embeddings ``[n, hidden]`` of the init.

    An input prompt is those embeddings. A key/value prompt is the keys and values
    ``init_model`` computes over them (after BOS, at the positions the prompt will hold):
    ``init_model`` the dense base gives an IntactKV-style start, the tuned model itself the
    exact counterpart of the input prompt.
    """
    if kind == "input":
        return InputPrompt(embeddings.float())
    with torch.no_grad():
        cache = context_cache(init_model, embeddings, bos)
    skip = int(bos is not None)
    keys = [k[0, :, skip:].float().cpu() for k in cache.keys]
    values = [v[0, :, skip:].float().cpu() for v in cache.values]
    if any(k.shape[1] != embeddings.shape[0] for k in keys):
        raise CTPError(f"a key/value prompt of {embeddings.shape[0]} tokens does not fit a "
                       "sliding-window layer of this model: use fewer virtual tokens")
    prompt = KVPrompt(KVPrompt.flatten(keys, values), kv_geometry(model))
    return prompt
