"""lm-evaluation-harness plugin: ``--model ctp`` evaluates a compressed model, optionally behind a
soft prompt, or compresses a base model in memory first.

    ctp lm-eval --model ctp --model_args pretrained=DIR,prompt=PROMPT --tasks arc_easy
    ctp lm-eval --model ctp --model_args pretrained=BASE,prune=magnitude,quant=nf4 --tasks ...

``CTPLM`` is lm-eval's own ``HFLM`` handed a model ctp built (lm-eval's loader would pass
``load_in_4bit``, which transformers 5 ignores, and would miss ctp's CPU fixes for 4-bit layers).
A prompt's keys and values are computed once (:class:`ctp.lm.PromptCache`) and every forward
pass, scoring or generating, reads the requests' tokens after them: a request costs what it costs
without a prompt, plus attention to the prompt's keys. ``_model_call`` returns logits of the real
tokens only, so HFLM scores exactly the continuation tokens it scores without a prompt.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import resolve_max_length
from lm_eval.models.utils_hf import stop_sequences_criteria
from torch import nn

from ..artifacts import is_quantized_dir, read_compression_meta, read_prompt_meta
from ..compression.pipeline import compress
from ..config import CompressConfig, from_dict
from ..errors import CTPError
from ..config import BOS_RULES
from ..lm import (PromptCache, bos_token, decode, has_sliding_layers, prompted_logits, stop_token_ids,
                  token_picker)
from ..models import load_any, load_tokenizer, resolve_model
from ..prompt.kinds import SoftPrompt, context_of, load_prompt
from ..prompt.stitch import check_compatible
from ..runtime import ready_for_device_, resolve_device, torch_dtype
from .lm_eval_registry import register  # noqa: F401  (re-exported: tests and launchers call it)

log = logging.getLogger(__name__)

# model_args that ask for in-memory compression; each is the CompressConfig field of that name.
COMPRESS_ARGS = ("prune", "sparsity", "pattern", "magnitude_scope", "quant", "double_quant",
                 "rounding", "dampening", "blocksize", "calib", "nsamples", "seqlen", "seed")


def _compress_in_memory(pretrained: str, args: dict[str, Any], device: torch.device,
                        dtype: torch.dtype | None, tokenizer: Any,
                        trust_remote_code: bool) -> tuple[nn.Module, dict[str, Any]]:
    """``compress(pretrained, CompressConfig(**args), out=None)``, made ready for inference."""
    if is_quantized_dir(resolve_model(pretrained)):
        raise CTPError(f"{pretrained} is already compressed; prune=/quant=/... compress a dense base")
    # lm-eval parses "none" as None; ctp spells it "none"
    values = {k: ("none" if v is None and k in ("prune", "quant") else v) for k, v in args.items()}
    values |= {"device": str(device), "trust_remote_code": trust_remote_code}
    config = from_dict(CompressConfig, values, where="model_args")
    result = compress(pretrained, config, out=None, tokenizer=tokenizer, progress=False)
    model = result.model.to(device)
    if config.quant == "none":
        model = model.to(dtype or (torch.float32 if device.type == "cpu" else model.dtype))
    else:  # the fixes load_any applies to a compressed folder (see ctp.models.load_any)
        ready_for_device_(model, device, dtype)
    return model.eval(), result.report


def _attach_prompt(prompt_dir: str, model: nn.Module, model_name: str, tokenizer: Any,
                   report: dict[str, Any] | None) -> tuple[SoftPrompt, list[str]]:
    """The prompt (either kind) in ``prompt_dir``, after ctp's stitch checks against ``model``.

    ``report`` is the in-memory compression report: its base fingerprint stands in for the
    ``ctp_compression.json`` that ``check_compatible`` reads from a folder (the fingerprint of
    freshly pruned weights is not the base's, which would be a false warning).
    """
    embeddings = load_prompt(prompt_dir)
    meta = read_prompt_meta(prompt_dir)
    checked = meta if report is None else {k: v for k, v in meta.items() if k != "base_fingerprint"}
    warnings = check_compatible(prompt_dir, embeddings, checked, model_name, model, tokenizer)
    want = meta.get("base_fingerprint")
    if report is not None and want and want != report["base_fingerprint"]:
        warnings.append(f"prompt {prompt_dir} was trained on base model {meta.get('base_model')} "
                        f"(fingerprint {want}); {model_name} is another ({report['base_fingerprint']})")
    for w in warnings:
        log.warning(w)
    return embeddings, warnings


def _register_as_ctp(cls: type) -> type:
    # Under `python -m` this file runs as __main__; main() then imports it by its real name, and
    # only that class may be registered (a second class under "ctp" is an lm-eval error).
    return cls if __name__ == "__main__" else register_model("ctp")(cls)


@_register_as_ctp
class CTPLM(HFLM):
    """HFLM over a ctp-built model: a compressed (or dense) folder, an optional prompt folder,
    or a base model compressed in memory when any of :data:`COMPRESS_ARGS` is given."""

    def __init__(self, pretrained: str, prompt: str | None = None, device: str | None = None,
                 dtype: str | torch.dtype | None = "auto", batch_size: int | str = 1,
                 max_batch_size: int | None = 64, max_length: int | None = None,
                 trust_remote_code: bool = False, bos: str = "auto", **kwargs: Any) -> None:
        """``pretrained``: a compressed or dense folder, hub id or ``embedded`` (the base model
        when compressing); ``prompt``: a prompt folder (either kind); ``device``: default cuda
        if available; ``dtype``: auto = float32 on a CPU; ``bos``: ctp's BOS rule (auto,
        always, never; :func:`ctp.lm.bos_token`) -- with a BOS every request starts with it and
        a prompt stands after it; without, no BOS is added (where lm-eval would let the
        tokenizer decide: ``ctp eval``'s protocol); other ``kwargs``: :data:`COMPRESS_ARGS` or
        HFLM's."""
        if bos not in BOS_RULES:
            raise CTPError(f"unknown bos={bos!r}; choose from {', '.join(BOS_RULES)}")
        if "add_bos_token" in kwargs:
            raise CTPError("--model ctp puts BOS by its rule (before the prompt): give "
                           "bos=auto|always|never, not add_bos_token")
        compress_args = {k: kwargs.pop(k) for k in COMPRESS_ARGS if k in kwargs}
        if "peft" in kwargs or "delta" in kwargs:
            raise CTPError("model_args peft=/delta= are not used by --model ctp; give prompt=FOLDER")
        if "tokenizer" in kwargs:
            raise CTPError("--model ctp uses the model folder's own tokenizer (prompts are tied to it)")
        known = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(kwargs) - known)
        if unknown:  # HFLM would silently drop them: it ignores **kwargs when handed a model
            raise CTPError(f"unknown model_args {', '.join(unknown)}; --model ctp takes "
                           f"pretrained, prompt, {', '.join(COMPRESS_ARGS)} and HFLM's own")
        pretrained = str(pretrained)
        if (device is None or str(device).startswith("cuda")) and not torch.cuda.is_available():
            # lm-eval asks for cuda:0 when no --device is given; its own hf model falls back too
            log.warning("no CUDA GPU: --model ctp runs on the CPU")
            device = "cpu"
        torch_device = resolve_device(str(device) if device else "auto")
        dtype = torch_dtype(dtype)
        tokenizer = load_tokenizer(pretrained, trust_remote_code)
        report = None
        if compress_args:
            model, report = _compress_in_memory(pretrained, compress_args, torch_device, dtype,
                                                tokenizer, trust_remote_code)
            label = report["label"]
        else:
            model = load_any(pretrained, device=torch_device, dtype=dtype,
                             trust_remote_code=trust_remote_code)
            folder = Path(resolve_model(pretrained))
            meta = read_compression_meta(folder) if folder.is_dir() else None
            label = meta["label"] if meta is not None else None
        self._base = model
        self._prompt: SoftPrompt | None = None
        self._prompt_cache: PromptCache | None = None
        self._bos = bos_token(bos, model.config, tokenizer)
        warnings: list[str] = []
        if prompt is not None:
            self._prompt, warnings = _attach_prompt(str(prompt), model, pretrained, tokenizer, report)
        self.num_virtual_tokens = 0 if self._prompt is None else self._prompt.num_virtual_tokens
        self.ctp_info = {"pretrained": pretrained, "prompt": prompt, "compression": label,
                         "compressed_in_memory": report is not None,
                         "prompt_type": None if self._prompt is None else self._prompt.kind,
                         "num_virtual_tokens": self.num_virtual_tokens, "bos_token_id": self._bos,
                         "warnings": warnings}
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                         max_batch_size=max_batch_size, max_length=max_length,
                         add_bos_token=False, **kwargs)
        context = resolve_max_length(self.config, self.tokenizer, default=self._DEFAULT_MAX_LENGTH)
        if self.num_virtual_tokens and self.max_length + self.num_virtual_tokens > context:
            raise CTPError(f"max_length {self.max_length} plus {self.num_virtual_tokens} virtual "
                           f"tokens exceeds the model's context of {context}")

    @property
    def max_length(self) -> int:
        """Real tokens per forward pass: the model's context less the prompt's virtual tokens
        (HFLM truncates and windows inputs to this length; the prompt must fit too)."""
        if self._max_length:
            return self._max_length
        return resolve_max_length(self.config, self.tokenizer,
                                  default=self._DEFAULT_MAX_LENGTH) - self.num_virtual_tokens

    def _autocast(self) -> torch.autocast:
        """HFLM's mixed precision, when it has one (``mixed_precision_dtype``)."""
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    @property
    def prompt_cache(self) -> PromptCache | None:
        """What stands before every request -- BOS (per the rule) and the prompt -- as keys and
        values, built on first use (after HFLM has placed the model); None: neither."""
        if (self._prompt is not None or self._bos is not None) and self._prompt_cache is None:
            with self._autocast():
                self._prompt_cache = context_of(self._base, self._prompt, self._bos)
        return self._prompt_cache

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, T, vocab]`` of ``inps`` ``[batch, T]`` (right-padded by HFLM) read
        after the cache (BOS, prompt): no virtual positions, so HFLM's slicing needs no offset.

        HFLM adds no special tokens here (the rule puts BOS in the cache), except its prefix
        token before an empty context or a rolling window: a row that starts with BOS has that
        BOS read as the cache's, and its position's logits are what the model predicts from BOS
        alone -- the prompt never earns the first token, as in ``ctp eval``.
        """
        cache = self.prompt_cache
        if cache is None:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad(), self._autocast():
            lead = (inps[:, 0] == self._bos) if self._bos is not None else None
            if lead is None or not bool(lead.any()):
                return prompted_logits(self._base, inps, cache)[0]
            shifted = inps.clone()  # leading BOS removed, rows padded at the end (never scored)
            shifted[lead, :-1] = inps[lead, 1:]
            logits = prompted_logits(self._base, shifted, cache)[0]
            out = logits.clone()
            out[lead, 1:] = logits[lead, :-1]
            out[lead, 0] = cache.bos_logits[0, 0].to(out.device, out.dtype)
            return out

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        """``context`` ``[batch, T]`` (left-padded) followed by up to ``max_length - T`` new
        tokens, decoded after the cache (BOS, prompt); a padded row computes what it would alone.

        PEFT's own ``generate`` is not used: with transformers 5 it misses the KV cache and
        re-inserts the prompt at every decoding step. Greedy, or sampling with ``temperature``,
        ``top_p`` and ``top_k`` (torch's global generator, which lm-eval's ``--seed`` seeds).
        """
        if self.prompt_cache is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        mask = generation_kwargs.pop("attention_mask", None)
        mask = None if mask is None else mask.to(context.device)
        if self._bos is not None:  # a row whose first real token is BOS: that BOS is the cache's
            mask = torch.ones_like(context) if mask is None else mask.clone()
            rows = torch.arange(context.shape[0], device=context.device)
            first = mask.argmax(dim=1)
            lead = context[rows, first] == self._bos
            mask[rows[lead], first[lead]] = 0
        pick = self._picker(generation_kwargs)
        eos = stop_token_ids(self._base, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        new = max_length - context.shape[1]
        if mask is not None and not bool(mask.all()) and has_sliding_layers(self._base.config):
            # a sliding window counts cache slots, padding included: a left-padded row would see
            # fewer real tokens in its window than alone, so each row is decoded by itself
            real = [context[i:i + 1][:, mask[i].bool()] for i in range(context.shape[0])]
            rows = [self._decode(r, None, new, stop, pick, eos, pad)[:, r.shape[1]:] for r in real]
            longest = max(r.shape[1] for r in rows)
            tails = [torch.cat([r, r.new_full((1, longest - r.shape[1]), pad)], dim=1) for r in rows]
            return torch.cat([context, torch.cat(tails)], dim=1)
        return self._decode(context, mask, new, stop, pick, eos, pad)  # HFLM slices the context off

    def _decode(self, context: torch.Tensor, mask: torch.Tensor | None, new: int, stop: list[str],
                pick: Callable[[torch.Tensor], torch.Tensor], eos: tuple[int, ...], pad: int) -> torch.Tensor:
        """``context`` followed by up to ``new`` tokens decoded after the cache, until every row
        has met one of ``stop`` or an EOS."""
        stopping = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
        out = context
        with self._autocast():
            for chosen in decode(self._base, context, self.prompt_cache, mask, max_new_tokens=new,
                                 pick=pick, eos_ids=eos, pad_id=pad):
                out = torch.cat([out, chosen.unsqueeze(1)], dim=1)
                if bool(stopping(out, None).all()):
                    break
        return out

    @staticmethod
    def _picker(generation_kwargs: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The token picker for lm-eval's generation kwargs; others are refused, not ignored."""
        kwargs = dict(generation_kwargs)
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_p = float(kwargs.pop("top_p", None) or 1.0)
        top_k = int(kwargs.pop("top_k", None) or 0)
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise CTPError(f"--model ctp with a prompt does not support the generation "
                           f"arguments {', '.join(unknown)}")
        if not do_sample:
            return token_picker()
        return token_picker(temperature or 1.0, top_p, top_k)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records in the results' ``config``: ctp's provenance (no Hub lookups)."""
        weight = self._base.get_input_embeddings().weight
        return {"model_num_parameters": sum(p.numel() for p in self._base.parameters()),
                "model_dtype": str(weight.dtype), "ctp": self.ctp_info}


def main(argv: Sequence[str] | None = None) -> int:
    """``ctp lm-eval ARGS``: lm-eval's own command line, unchanged, with ``--model ctp`` known."""
    from lm_eval.__main__ import cli_evaluate

    importlib.import_module("ctp.evaluation.lm_eval_plugin")  # registers CTPLM, even under `-m`

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SystemExit as exc:  # --help, or argparse's usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except CTPError as exc:
        print(f"ctp lm-eval: error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
