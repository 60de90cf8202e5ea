"""Prompt folders (PEFT prompt-tuning adapters + ``ctp_prompt.json``) and training checkpoints.

A prompt folder is exactly what PEFT writes for prompt tuning -- ``adapter_config.json`` and
``adapter_model.safetensors`` holding one tensor, ``prompt_embeddings`` ``[n, hidden]`` -- so
``PeftModel.from_pretrained(model, folder)`` loads it. ``ctp_prompt.json`` next to it records
what the prompt was trained on. Checkpoints hold tensors in safetensors and everything else in
JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import read_json, write_json
from ..errors import CTPError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPT_FILE = "ctp_prompt.json"


def write_prompt_folder(folder: Path, prompt: torch.Tensor, base_model: str, num_layers: int,
                        num_attention_heads: int, meta: dict[str, Any]) -> None:
    """Write ``prompt`` ``[n, hidden]`` as a PEFT prompt-tuning adapter plus ``ctp_prompt.json``."""
    from peft import PromptTuningConfig, TaskType

    n, hidden = prompt.shape
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=n,
        token_dim=hidden,
        num_transformer_submodules=1,
        num_attention_heads=num_attention_heads,
        num_layers=num_layers,
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(folder))
    save_file({"prompt_embeddings": prompt.detach().float().cpu().contiguous()},
              str(folder / ADAPTER_WEIGHTS))
    write_json(folder / PROMPT_FILE, meta)


def load_prompt_embeddings(prompt: str | os.PathLike | torch.Tensor | None) -> torch.Tensor | None:
    """A soft prompt ``[n, hidden]`` (float32) from a tensor or a prompt folder."""
    if prompt is None or isinstance(prompt, torch.Tensor):
        return prompt
    path = Path(prompt) / ADAPTER_WEIGHTS
    if not path.exists():
        raise CTPError(f"{prompt} is not a prompt folder (no {ADAPTER_WEIGHTS})")
    tensors = load_file(str(path))
    if "prompt_embeddings" not in tensors:
        raise CTPError(f"{path} holds no prompt_embeddings tensor (not a prompt-tuning adapter)")
    return tensors["prompt_embeddings"].float()


def read_prompt_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """``ctp_prompt.json`` of a prompt folder (empty if the folder came from plain PEFT)."""
    path = Path(folder) / PROMPT_FILE
    return read_json(path) if path.exists() else {}


# ---------------------------------------------------------------------------------------------
# checkpoints: tensors -> safetensors, the rest -> JSON
# ---------------------------------------------------------------------------------------------


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: ``folder`` is replaced in one rename when complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    write_json(tmp / "state.json", state)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(work: Path) -> Path | None:
    """The complete checkpoint in a run's work folder: ``checkpoint``, or ``checkpoint.old``
    when a crash hit :func:`save_checkpoint` between its two renames."""
    for name in ("checkpoint", "checkpoint.old"):
        folder = work / name
        if (folder / "state.json").exists() and (folder / "tensors.safetensors").exists():
            return folder
    return None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    if not (folder / "state.json").exists() or not (folder / "tensors.safetensors").exists():
        raise CTPError(f"no complete checkpoint in {folder}")
    return load_file(str(folder / "tensors.safetensors")), json.loads((folder / "state.json").read_text())


def optimizer_to_checkpoint(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict into tensors (``optim.<param>.<key>``) and JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_checkpoint(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                              meta: dict) -> None:
    """Inverse of :func:`optimizer_to_checkpoint`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
