"""``ctp generate`` / ``ctp.generate()``: see what a (compressed) model says behind its soft
prompt, next to what it says without it.

The prompt's keys and values are computed once per (model, prompt) (:class:`ctp.lm.PromptCache`)
and every input is decoded after them, so a prompt of any length costs nothing per input; greedy
generations equal those of the prepended prompt token for token. Decoding is ctp's own loop
(:func:`ctp.lm.decode`): greedy, or sampling with a temperature and top-p from a generator seeded
anew for every generation, so an output depends only on its input and the settings.

    gen = load_generator("stitched-pair-folder")          # or (model_dir, prompt_dir)
    for piece in gen.stream(["The model"]):                # streamed as it is decoded
        print(piece.text, end="", flush=True)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import BOS_RULES, check_device
from .errors import CTPError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .lm import PromptCache
    from .prompt.kinds import SoftPrompt

# torch and everything that needs it are imported inside the functions: the CLI builds its
# parser from GenerateConfig, and `ctp --help` must not wait for torch.

log = logging.getLogger(__name__)


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass
class GenerateConfig:
    """How to generate text."""

    max_new_tokens: int = field(default=64, metadata=_help("stop after this many new tokens (or at EOS)"))
    temperature: float = field(default=0.0, metadata=_help("0: greedy; otherwise sample from "
                                                           "softmax(logits / temperature)"))
    top_p: float = field(default=1.0, metadata=_help("sample only from the likeliest tokens whose "
                                                     "probability reaches top_p"))
    seed: int = field(default=0, metadata=_help("seed of the sampler, anew for every generation"))
    compare: bool = field(default=False, metadata=_help("also generate without the prompt (same seed)"))
    bos: str = field(default="auto", metadata=_help(
        "BOS before every input: auto (for the families trained to depend on it, the Gemmas), "
        "always or never -- the rule training and evaluation follow; the prompt sits after it"))
    device: str = field(default="auto", metadata=_help("auto (the GPU when there is one), cpu, cuda "
                                                       "or cuda:N"))
    trust_remote_code: bool = field(default=False, metadata=_help("allow the model repo's own code"))

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.bos not in BOS_RULES:
            raise CTPError(f"unknown bos {self.bos!r}; choose from {', '.join(BOS_RULES)}")
        if self.max_new_tokens <= 0:
            raise CTPError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise CTPError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CTPError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """One input's continuation: its text and token ids (EOS excluded), and why it stopped."""

    index: int  # which input
    input: str
    with_prompt: bool
    text: str
    token_ids: list[int]
    stop: str  # "eos" or "max_new_tokens"
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Piece:
    """A piece of streamed text; the last piece of a generation carries it whole in ``done``."""

    index: int
    with_prompt: bool
    text: str
    done: Generation | None = None


@dataclass
class TextGenerator:
    """A model, its tokenizer and optionally a prompt whose cache serves every input."""

    model: nn.Module
    tokenizer: Any
    config: GenerateConfig
    prompt: SoftPrompt | None = None
    prompt_cache: PromptCache | None = None  # BOS (per the rule) and the prompt
    bare_cache: PromptCache | None = None  # BOS alone (None without one): "without the prompt"
    name: str = "model"
    prompt_name: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prompt is None else self.prompt.num_virtual_tokens

    @property
    def context_length(self) -> int:
        """Positions before every input: BOS (per the rule) and the prompt."""
        cache = self.prompt_cache or self.bare_cache
        return 0 if cache is None else cache.length

    @property
    def eos_ids(self) -> tuple[int, ...]:
        from .lm import stop_token_ids

        return stop_token_ids(self.model, self.tokenizer)

    def encode_inputs(self, inputs: Sequence[str], config: GenerateConfig) -> list[list[int]]:
        """Token ids of every input (no special tokens: BOS comes from the rule, before the
        prompt), each checked to be non-empty and to fit the context with what stands before it
        and ``max_new_tokens`` (all are checked before anything is generated)."""
        from .lm import model_context

        if not inputs:
            raise CTPError("empty input: nothing to generate from")
        context = model_context(self.model)
        encoded = []
        for i, text in enumerate(inputs, 1):
            ids = (self.tokenizer(text, return_attention_mask=False, add_special_tokens=False)["input_ids"]
                   if text.strip() else [])
            if not ids:
                raise CTPError(f"input {i} is empty")
            need = self.context_length + len(ids) + config.max_new_tokens
            if context is not None and need > context:
                raise CTPError(f"input {i} has {len(ids)} tokens; with {self.context_length} positions "
                               f"before it (BOS, virtual tokens) and max_new_tokens "
                               f"{config.max_new_tokens} that is {need}, more than the model's "
                               f"context of {context}")
            encoded.append(ids)
        return encoded

    def stream(self, inputs: str | Sequence[str], config: GenerateConfig | None = None) -> Iterator[Piece]:
        """Generate for each input in turn (with the prompt, then without it if ``compare``),
        yielding text as it is decoded. Inputs are validated first (CTPError)."""
        config = config or self.config
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        if config.compare and self.prompt is None:
            raise CTPError("compare needs a prompt (--prompt, or a stitched pair folder)")
        encoded = self.encode_inputs(inputs, config)
        variants = [True, False] if config.compare else [self.prompt is not None]
        for index, (text, ids) in enumerate(zip(inputs, encoded)):
            for with_prompt in variants:
                yield from self._stream_one(index, text, ids, with_prompt, config)

    def generate(self, inputs: str | Sequence[str], config: GenerateConfig | None = None) -> list[Generation]:
        """Every generation of :meth:`stream`, whole."""
        return [p.done for p in self.stream(inputs, config) if p.done is not None]

    def _stream_one(self, index: int, text: str, ids: list[int], with_prompt: bool,
                    config: GenerateConfig) -> Iterator[Piece]:
        import torch

        from .lm import decode, input_device, token_picker

        device = input_device(self.model)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        pick = token_picker(config.temperature, config.top_p, generator=generator)
        eos = self.eos_ids
        new: list[int] = []
        shown, stop, started = "", "max_new_tokens", time.perf_counter()
        steps = decode(self.model, torch.tensor([ids], device=device),
                       self.prompt_cache if with_prompt else self.bare_cache,
                       max_new_tokens=config.max_new_tokens,
                       pick=pick, eos_ids=eos, pad_id=eos[0] if eos else 0)
        for chosen in steps:
            token = int(chosen[0])
            if token in eos:
                stop = "eos"
                break
            new.append(token)
            full = self.tokenizer.decode(new, skip_special_tokens=True)
            # hold back a partial multi-byte character until its last byte arrives
            if full.startswith(shown) and not full.endswith("\ufffd") and len(full) > len(shown):
                yield Piece(index, with_prompt, full[len(shown):])
                shown = full
        full = self.tokenizer.decode(new, skip_special_tokens=True)
        done = Generation(index=index, input=text, with_prompt=with_prompt, text=full, token_ids=new,
                          stop=stop, seconds=time.perf_counter() - started)
        yield Piece(index, with_prompt, full[len(shown):] if full.startswith(shown) else "", done)


def _pair_prompt(model: str) -> str | None:
    """The prompt folder of a stitched pair (``ctp stitch --out``), or None for another folder."""
    from .artifacts import PAIR_PROMPT_DIR, STITCH_FILE, read_stitch_meta
    from .models import resolve_model

    folder = Path(resolve_model(model))
    if not (folder / STITCH_FILE).is_file():
        return None
    read_stitch_meta(folder)  # a damaged pair is an error, not a bare model
    return str(folder / PAIR_PROMPT_DIR)


def load_generator(model: str | nn.Module, prompt: str | os.PathLike | torch.Tensor | SoftPrompt | None = None,
                   config: GenerateConfig | None = None, *, tokenizer: Any = None) -> TextGenerator:
    """Load a model (compressed or dense folder, hub id, ``embedded``, or a stitched pair folder,
    whose ``prompt/`` is used when no ``prompt`` is given) and build the prompt's cache once.

    A prompt folder must fit the model (hidden size, tokenizer: :func:`check_compatible`); a
    different base model is a warning (``warnings``, also logged).
    """
    from .artifacts import read_prompt_meta
    from .lm import bos_token
    from .models import load_any, load_tokenizer
    from .prompt.kinds import context_of, load_prompt
    from .prompt.stitch import check_compatible

    config = config or GenerateConfig()
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
    if isinstance(model, str):
        prompt = prompt if prompt is not None else _pair_prompt(model)
        tokenizer = tokenizer or load_tokenizer(model, config.trust_remote_code)
        model = load_any(model, device=config.device, trust_remote_code=config.trust_remote_code)
    elif tokenizer is None:
        raise CTPError("generate needs the tokenizer of a loaded model")
    soft = load_prompt(prompt)
    warnings: list[str] = []
    if soft is not None and isinstance(prompt, (str, os.PathLike)):
        warnings = check_compatible(str(prompt), soft, read_prompt_meta(prompt), str(name),
                                    model, tokenizer)
        for w in warnings:
            log.warning(w)
    bos = bos_token(config.bos, model.config, tokenizer)
    bare = context_of(model, None, bos)
    cache = None if soft is None else context_of(model, soft, bos)  # checks the prompt's shape
    return TextGenerator(model=model, tokenizer=tokenizer, config=config, prompt=soft,
                         prompt_cache=cache, bare_cache=bare, name=str(name), warnings=warnings,
                         prompt_name=str(prompt) if isinstance(prompt, (str, os.PathLike)) else None)


def generate(model: str | nn.Module, inputs: str | Sequence[str],
             prompt: str | os.PathLike | torch.Tensor | None = None, config: GenerateConfig | None = None,
             *, tokenizer: Any = None) -> dict[str, Any]:
    """Continue each of ``inputs`` with ``model`` behind ``prompt`` (see :func:`load_generator`).

    Returns ``{"model", "prompt", "num_virtual_tokens", "prompt_cache_bytes", "warnings",
    "outputs": [{"index", "input", "with_prompt", "text", "token_ids", "stop", "seconds"}]}``.
    For streaming, use ``load_generator(...).stream(inputs)``.
    """
    generator = load_generator(model, prompt, config, tokenizer=tokenizer)
    return generation_report(generator, generator.generate(inputs))


def generation_report(generator: TextGenerator, outputs: list[Generation]) -> dict[str, Any]:
    """The JSON-ready record of a run: what was loaded and every generation."""
    cache = generator.prompt_cache
    return {"model": generator.name, "prompt": generator.prompt_name,
            "prompt_type": None if generator.prompt is None else generator.prompt.kind,
            "num_virtual_tokens": generator.num_virtual_tokens,
            "bos": generator.context_length > generator.num_virtual_tokens,
            "prompt_cache_bytes": 0 if cache is None else cache.nbytes,
            "warnings": list(generator.warnings),
            "outputs": [{**asdict(g), "tokens_per_second": g.tokens_per_second} for g in outputs]}
