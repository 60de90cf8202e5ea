"""Stitching: attach a saved prompt to another compressed (or dense) copy of the same base model.

The checks come from the two artifacts' metadata: the prompt's ``ctp_prompt.json`` and the
target's ``ctp_compression.json``. A different hidden size (an input prompt), a different number
of layers, key/value heads or head size (a key/value prompt), or another tokenizer is an error
(the prompt cannot mean anything there); a different base-model fingerprint is a warning (the paper moves
prompts across compression levels and methods of one base; across bases it is the user's call);
a prompt that leaves no room in the target's context is an error.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts import PAIR_PROMPT_DIR, STITCH_FILE, atomic_dir, read_compression_meta, read_prompt_meta, write_json
from ..errors import CTPError
from ..lm import model_context
from ..models import load_any, load_tokenizer, resolve_model, tokenizer_fingerprint, weights_fingerprint
from .kinds import SoftPrompt, load_prompt

log = logging.getLogger(__name__)


@dataclass
class StitchResult:
    """A target model with a prompt attached: ``model`` is a ready ``PeftModel``."""

    model: nn.Module
    prompt: SoftPrompt
    base: nn.Module
    tokenizer: Any
    warnings: list[str] = field(default_factory=list)


def target_fingerprint(model_dir: str, model: nn.Module) -> str | None:
    """The base-model fingerprint of a target: from its ctp_compression.json, else its weights."""
    meta = read_compression_meta(model_dir) if Path(model_dir).is_dir() else None
    if meta is not None:
        return meta["base_fingerprint"]
    if any(hasattr(p, "quant_state") for p in model.parameters()):
        return None
    return weights_fingerprint(model)


def check_compatible(prompt_dir: str, prompt: SoftPrompt | torch.Tensor, meta: dict[str, Any],
                     model_dir: str, model: nn.Module, tokenizer: Any) -> list[str]:
    """Raise CTPError for a prompt that cannot work on the target; return warnings otherwise.

    Errors: an input prompt's hidden size, or a key/value prompt's layers, key/value heads or
    head size, differs from the target's; another tokenizer; no room left in the context.
    Warning: the target derives from another base model (another weights fingerprint).
    """
    prompt = load_prompt(prompt)
    reason = prompt.mismatch(model)
    if reason is not None:
        raise CTPError(f"{reason} (prompt {prompt_dir}, model {model_dir})")
    want = meta.get("tokenizer_fingerprint")
    have = tokenizer_fingerprint(tokenizer)
    if want and want != have:
        raise CTPError(f"tokenizer mismatch: prompt {prompt_dir} was trained with tokenizer {want}, "
                       f"model {model_dir} has {have}")
    context = model_context(model)
    if context is not None and prompt.num_virtual_tokens >= context:
        raise CTPError(f"prompt {prompt_dir} has {prompt.num_virtual_tokens} virtual tokens, leaving "
                       f"no room in the context of {context} of model {model_dir}")
    warnings = []
    base = meta.get("base_fingerprint")
    target = target_fingerprint(model_dir, model)
    if base and target and base != target:
        warnings.append(f"prompt {prompt_dir} was trained on base model {meta.get('base_model')} "
                        f"(fingerprint {base}); {model_dir} derives from another base ({target})")
    return warnings


def stitch(prompt_dir: str | os.PathLike, model_dir: str, device: str = "auto",
           trust_remote_code: bool = False) -> StitchResult:
    """Attach the prompt in ``prompt_dir`` to the model in ``model_dir`` after checking they fit.

    Returns a ``PeftModel`` (PEFT's prompt-tuning or prefix-tuning model, as the prompt's kind
    is; generation and PEFT tooling work as usual), the prompt, the bare target model, its
    tokenizer, and any warnings (also logged).
    """
    from peft import PeftModel

    prompt_dir = str(prompt_dir)
    prompt = load_prompt(prompt_dir)
    meta = read_prompt_meta(prompt_dir)
    base = load_any(model_dir, device=device, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    warnings = check_compatible(prompt_dir, prompt, meta, model_dir, base, tokenizer)
    for w in warnings:
        log.warning(w)
    peft_model = PeftModel.from_pretrained(base, prompt_dir).eval()
    return StitchResult(model=peft_model, prompt=prompt, base=base, tokenizer=tokenizer,
                        warnings=warnings)


def save_stitched(prompt_dir: str, model_dir: str, out: str | os.PathLike, overwrite: bool = False,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write a deployable folder: the target checkpoint's files plus ``prompt/`` (the adapter)
    and ``ctp_stitch.json``. Load it with ``from_pretrained(out)`` then
    ``PeftModel.from_pretrained(model, out + "/prompt")``."""
    source = Path(resolve_model(model_dir))
    if not source.is_dir():
        raise CTPError(f"--out needs a local model folder to copy; {model_dir} is not one "
                       "(download it first, e.g. with `hf download`)")
    with atomic_dir(out, overwrite) as staging:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        shutil.copytree(prompt_dir, staging / PAIR_PROMPT_DIR)
        write_json(staging / STITCH_FILE, {"model": str(model_dir), "prompt": str(prompt_dir),
                                           **(extra or {})})
    return Path(out)
