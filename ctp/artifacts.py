"""ctp's file formats: their names, validating readers and atomic writers.

- a compressed checkpoint: what ``save_pretrained`` writes, plus ``ctp_compression.json``;
- a prompt: a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors`` holding
  ``prompt_embeddings``) plus ``ctp_prompt.json``: an *input* prompt is a prompt-tuning adapter
  (``[n, hidden]``), a *key/value* prompt a prefix-tuning one (``[n, layers x 2 x kv_heads x
  head_dim]``);
- a stitched pair: a checkpoint, its prompt in ``prompt/`` and ``ctp_stitch.json``;
- a training checkpoint: ``tensors.safetensors`` plus ``state.json``.

Every reader validates what it returns: a damaged or hand-edited file is a
:class:`~ctp.errors.CTPError` naming the file and what is wrong, never a traceback or a value
used as if it were valid. Tensors are read with safetensors only: nothing is ever unpickled.
Folders are written atomically (built in a temporary sibling, renamed into place when complete)
and with the user's umask, so a shared cluster can read them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CTPError

COMPRESSION_FILE = "ctp_compression.json"
PROMPT_FILE = "ctp_prompt.json"
STITCH_FILE = "ctp_stitch.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPT_TENSOR = "prompt_embeddings"
PAIR_PROMPT_DIR = "prompt"  # where a stitched pair keeps its prompt
PROMPT_TUNING, PREFIX_TUNING = "PROMPT_TUNING", "PREFIX_TUNING"  # PEFT's types: input, key/value
PROMPT_PEFT_TYPES = (PROMPT_TUNING, PREFIX_TUNING)
CHECKPOINT_TENSORS = "tensors.safetensors"
CHECKPOINT_STATE = "state.json"

# ---------------------------------------------------------------------------------------------
# atomic folders and JSON
# ---------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: the classic set-and-restore
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike | None = None, prefix: str = "ctp-") -> Path:
    """A new empty folder with the permissions a plain ``mkdir`` would give (``mkdtemp`` makes
    it private, mode 700, which the rest of a shared cluster cannot read)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def follow_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` the mode the umask allows (some writers,
    safetensors among them, create files readable by their owner only)."""
    mask = current_umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output path unless ``overwrite``; return it as a Path."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise CTPError(f"output folder {path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise CTPError(f"output path {path} exists and is not a folder")
    return path


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename.

    On any exception the temporary folder is removed and ``out`` is left untouched.
    """
    final = check_output_dir(out, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final.parent, prefix=f".{final.name}.tmp-")
    try:
        yield tmp
        follow_umask(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order) with a trailing newline."""
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing, unreadable or malformed file is a CTPError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CTPError(f"{path} not found") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise CTPError(f"{path} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CTPError(f"{path} is not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

_NUMBER = (int, float)
_TYPE_NAMES = {str: "a string", dict: "a mapping", int: "an integer", float: "a number",
               list: "a list", bool: "true/false", type(None): "null"}


def _type_text(types: tuple[type, ...]) -> str:
    names = dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in types if t is not int or float not in types)
    return " or ".join(names)


def _check_fields(meta: Any, path: Path, required: dict[str, tuple[type, ...]],
                  optional: dict[str, tuple[type, ...]] | None = None) -> dict[str, Any]:
    """``meta`` must be a mapping whose keys have the given types (bools are not numbers)."""
    if not isinstance(meta, dict):
        raise CTPError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, types in {**required, **(optional or {})}.items():
        if key not in meta:
            if key in required:
                raise CTPError(f"{path}: required key {key!r} is missing")
            continue
        value = meta[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise CTPError(f"{path}: {key!r} must be {_type_text(types)}, got {value!r:.60}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CTPError(f"{path}: {key!r} is not a finite number ({value})")
    return meta


_COMPRESSION_FIELDS = {
    "base_model": (str,), "base_fingerprint": (str, type(None)), "compression": (dict,),
    "label": (str,), "sparsity": (dict,), "bits_per_weight": _NUMBER,
}
_PROMPT_FIELDS = {
    "num_virtual_tokens": (int,), "hidden_size": (int,), "tokenizer_fingerprint": (str, type(None)),
    "base_fingerprint": (str, type(None)), "prompt_config": (dict,), "best_val_ppl": _NUMBER,
}
_PROMPT_OPTIONAL = {
    "prompt_type": (str,), "kv_layers": (int,), "kv_heads": (int,), "head_dim": (int,),
    "objective": (str,), "bos_token_id": (int, type(None)),
    "model": (str, type(None)), "base_model": (str, type(None)), "compression": (dict, type(None)),
    "compression_label": (str, type(None)), "val_ppl_without_prompt": (*_NUMBER, type(None)),
}
_STITCH_FIELDS = {"model": (str,), "prompt": (str,)}


def read_compression_meta(folder: str | os.PathLike, required: bool = False) -> dict[str, Any] | None:
    """``ctp_compression.json`` of a model folder, validated; None when absent (unless required).

    The stored ``compression`` settings must form a valid :class:`~ctp.config.CompressConfig`.
    """
    from .config import CompressConfig, from_dict

    path = Path(folder) / COMPRESSION_FILE
    if not path.is_file():
        if required:
            raise CTPError(f"{folder} has no {COMPRESSION_FILE}: not a model compressed by ctp")
        return None
    meta = _check_fields(read_json(path), path, _COMPRESSION_FIELDS)
    from_dict(CompressConfig, meta["compression"], where=f"{path}: compression")
    return meta


def read_prompt_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """``ctp_prompt.json`` of a prompt folder, validated (empty if the folder came from plain
    PEFT, which writes none)."""
    path = Path(folder) / PROMPT_FILE
    if not path.exists():
        return {}
    meta = _check_fields(read_json(path), path, _PROMPT_FIELDS, _PROMPT_OPTIONAL)
    kind = meta.get("prompt_type", "input")
    if kind not in ("input", "kv"):
        raise CTPError(f"{path}: 'prompt_type' must be input or kv, got {kind!r}")
    if kind == "kv":
        _check_fields(meta, path, {"kv_layers": (int,), "kv_heads": (int,), "head_dim": (int,)})
    return meta


def read_stitch_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """``ctp_stitch.json`` of a stitched pair, validated."""
    path = Path(folder) / STITCH_FILE
    return _check_fields(read_json(path), path, _STITCH_FIELDS)


def compression_matches(folder: str | os.PathLike, config_dict: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a finished compression made with exactly these settings."""
    meta = read_compression_meta(folder)
    return meta is not None and meta["compression"] == config_dict


def read_model_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """A local model folder's ``config.json`` as a dict (None when it has none)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    return _check_fields(read_json(path), path, {})


def is_quantized_dir(folder: str | os.PathLike) -> bool:
    """Whether a checkpoint folder was saved with a (bitsandbytes) quantization config."""
    config = read_model_config(folder)
    return config is not None and "quantization_config" in config


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file is a CTPError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CTPError(f"{path} not found") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CTPError(f"{path} is not a readable safetensors file ({reason})") from None


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse a tensor holding NaN or infinity (a damaged file, or a diverged run)."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CTPError(f"{what} holds {bad} non-finite values (NaN or infinity)")
    return tensor


def prompt_peft_type(folder: str | os.PathLike) -> str:
    """The PEFT type of a prompt folder's adapter: ``PROMPT_TUNING`` (an input prompt) or
    ``PREFIX_TUNING`` (a key/value prompt); anything else is a CTPError."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():  # a folder of tensors only: an input prompt, as ctp first wrote them
        return PROMPT_TUNING
    config = _check_fields(read_json(path), path, {}, {"peft_type": (str,)})
    peft_type = config.get("peft_type", PROMPT_TUNING)
    if peft_type not in PROMPT_PEFT_TYPES:
        raise CTPError(f"{path}: peft_type {peft_type!r} is not a soft prompt ctp can use "
                       f"({' or '.join(PROMPT_PEFT_TYPES)})")
    if config.get("prefix_projection"):
        raise CTPError(f"{path}: a prefix-tuning adapter with prefix_projection (an MLP "
                       "reparameterisation) is not supported; save the projected prefix instead")
    return peft_type


def load_prompt_embeddings(prompt: str | os.PathLike | torch.Tensor | None) -> torch.Tensor | None:
    """A soft prompt's tensor ``[n, width]`` (float32) from a tensor or a prompt folder, checked
    to be a finite 2-D float tensor that agrees with the folder's ``ctp_prompt.json``: ``width``
    is the hidden size for an input prompt, ``layers x 2 x kv_heads x head_dim`` for a key/value
    prompt (PEFT's ``prompt_embeddings`` of prompt tuning and of prefix tuning)."""
    if prompt is None:
        return None
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 2 or prompt.shape[0] == 0:
            raise CTPError(f"a prompt must be a [n, hidden] tensor, got shape {tuple(prompt.shape)}")
        return check_finite(prompt, "the prompt tensor")
    folder = Path(prompt)
    path = folder / ADAPTER_WEIGHTS
    if not path.exists():
        raise CTPError(f"{prompt} is not a prompt folder (no {ADAPTER_WEIGHTS})")
    prompt_peft_type(folder)
    tensors = load_tensors(path)
    if PROMPT_TENSOR not in tensors:
        raise CTPError(f"{path} holds no {PROMPT_TENSOR} tensor (not a prompt-tuning adapter)")
    tensor = tensors[PROMPT_TENSOR]
    if tensor.dim() != 2 or tensor.shape[0] == 0 or not torch.is_floating_point(tensor):
        raise CTPError(f"{path}: {PROMPT_TENSOR} must be a float [n, width] tensor, got "
                       f"{tensor.dtype} {tuple(tensor.shape)}")
    check_finite(tensor, str(path))
    meta = read_prompt_meta(folder)
    if meta:
        width = meta["hidden_size"]
        if meta.get("prompt_type") == "kv":
            width = meta["kv_layers"] * 2 * meta["kv_heads"] * meta["head_dim"]
        if (meta["num_virtual_tokens"], width) != tuple(tensor.shape):
            raise CTPError(f"{folder / PROMPT_FILE} describes a prompt of {meta['num_virtual_tokens']} x "
                           f"{width}, but {path} holds {tuple(tensor.shape)}")
    return tensor.float()


def write_adapter(folder: Path, tensor: torch.Tensor, peft_config: Any, meta: dict[str, Any]) -> None:
    """Write a PEFT prompt-learning adapter (``peft_config`` and ``tensor`` as its
    ``prompt_embeddings``) plus ``ctp_prompt.json`` into ``folder``."""
    from safetensors.torch import save_file

    peft_config.save_pretrained(str(folder))
    save_file({PROMPT_TENSOR: tensor.detach().float().cpu().contiguous()}, str(folder / ADAPTER_WEIGHTS))
    write_json(folder / PROMPT_FILE, meta)


def write_prompt_folder(folder: Path, prompt: torch.Tensor, base_model: str, num_layers: int,
                        num_attention_heads: int, meta: dict[str, Any]) -> None:
    """Write an input prompt ``[n, hidden]`` as a PEFT prompt-tuning adapter plus ``ctp_prompt.json``."""
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
    write_adapter(folder, prompt, config, meta)


# ---------------------------------------------------------------------------------------------
# training checkpoints: tensors -> safetensors, the rest -> JSON
# ---------------------------------------------------------------------------------------------


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: ``folder`` is replaced in one rename when complete."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / CHECKPOINT_TENSORS))
    write_json(tmp / CHECKPOINT_STATE, state)
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
        if (folder / CHECKPOINT_STATE).exists() and (folder / CHECKPOINT_TENSORS).exists():
            return folder
    return None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors checked to be finite)."""
    if not (folder / CHECKPOINT_STATE).exists() or not (folder / CHECKPOINT_TENSORS).exists():
        raise CTPError(f"no complete checkpoint in {folder}")
    tensors = load_tensors(folder / CHECKPOINT_TENSORS)
    for name, tensor in tensors.items():
        if torch.is_floating_point(tensor):
            check_finite(tensor, f"{folder / CHECKPOINT_TENSORS} ({name})")
    state = _check_fields(read_json(folder / CHECKPOINT_STATE), folder / CHECKPOINT_STATE,
                          {"settings": (dict,), "step": (int,), "history": (dict,), "best": (dict,),
                           "optimizer": (dict,), "scheduler": (dict,)})
    return tensors, state


def read_checkpoint_settings(folder: Path) -> dict[str, Any]:
    """The run settings a checkpoint was made with (to decide whether it can be resumed)."""
    path = folder / CHECKPOINT_STATE
    return _check_fields(read_json(path), path, {"settings": (dict,)})["settings"]


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
