"""Recipes: a whole pipeline in one YAML file, run by ``ctp run`` and resumable step by step.

```yaml
model: embedded                 # the dense base: hub id, folder or 'embedded'
workdir: ctp-demo               # models/, prompts/ and results/ go here
compress:                       # name -> CompressConfig fields
  wanda-50pct+nf4: {prune: wanda, sparsity: 0.5, quant: nf4, calib: embedded}
  wanda-2of4+nf4: {prune: wanda, pattern: "2:4", quant: nf4, calib: embedded}
prompts:                        # name -> the target it is tuned on (or a list) + PromptConfig fields
  p10: {target: wanda-50pct+nf4, config: {num_virtual_tokens: 10, data: embedded, steps: 200}}
  kv10: {target: [wanda-50pct+nf4, wanda-2of4+nf4], config: {prompt_type: kv, objective: kd}}
eval: {ppl: [embedded], seqlen: 256}   # EvalConfig fields; every prompt x every model
```

Every section is validated against the config dataclasses (an unknown key or a wrong type is
one error naming the key and the file). ``--set a.b.c=value`` overrides any entry (the value is
read as YAML). Steps whose outputs exist and were made with the same settings are skipped; an
interrupted prompt run resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .artifacts import read_compression_meta, read_prompt_meta
from .compression.pipeline import compress, is_complete
from .config import CompressConfig, EvalConfig, PromptConfig, from_dict, to_dict
from .errors import CTPError
from .prompt.state import resumable
from .prompt.tune import tune_prompt
from .runtime import resolve_device

log = logging.getLogger(__name__)

PACKAGED = Path(__file__).parent / "recipes"
TOP_KEYS = {"model", "workdir", "compress", "prompts", "eval"}


@dataclass
class PromptStep:
    """One prompt to tune: on which compressed target (or 'dense'), or on a list of targets at
    once (one prompt for several copies), with which settings."""

    target: str | list[str]
    config: PromptConfig

    @property
    def targets(self) -> list[str]:
        return self.target if isinstance(self.target, list) else [self.target]


@dataclass
class Recipe:
    """A validated recipe."""

    model: str
    workdir: Path
    compress: dict[str, CompressConfig]
    prompts: dict[str, PromptStep]
    eval: EvalConfig
    source: str


def apply_sets(data: dict[str, Any], sets: list[str], where: str) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a recipe mapping."""
    data = copy.deepcopy(data)
    for item in sets:
        if "=" not in item:
            raise CTPError(f"--set {item!r}: expected KEY=VALUE, e.g. prompts.p10.config.steps=50")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise CTPError(f"--set {key}: {where} has no section {part!r}")
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def parse_recipe(data: Any, where: str) -> Recipe:
    """Validate a recipe mapping; every error names the key and ``where``."""
    if not isinstance(data, dict):
        raise CTPError(f"{where}: a recipe must be a mapping")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise CTPError(f"{where}: unknown key {sorted(unknown)[0]!r}; known keys: {', '.join(sorted(TOP_KEYS))}")
    if not isinstance(data.get("model"), str):
        raise CTPError(f"{where}: 'model' must name the dense base model")
    if not isinstance(data.get("workdir", ""), (str, type(None))):
        raise CTPError(f"{where}: 'workdir' must be a folder path")
    targets = data.get("compress") or {}
    if not isinstance(targets, dict):
        raise CTPError(f"{where}: 'compress' must map names to compression settings")
    compress_steps = {str(name): from_dict(CompressConfig, cfg or {}, where=f"{where}: compress.{name}")
                      for name, cfg in targets.items()}
    prompt_specs = data.get("prompts") or {}
    if not isinstance(prompt_specs, dict):
        raise CTPError(f"{where}: 'prompts' must map names to {{target: ..., config: ...}}, "
                       f"got a {type(prompt_specs).__name__}")
    prompt_steps = {}
    for name, spec in prompt_specs.items():
        at = f"{where}: prompts.{name}"
        if not isinstance(spec, dict) or set(spec) - {"target", "config"}:
            raise CTPError(f"{at}: expected the keys 'target' and 'config'")
        targets = spec.get("target")
        names = targets if isinstance(targets, list) and targets else [targets]
        for target in names:
            if target not in compress_steps and target != "dense":
                raise CTPError(f"{at}: 'target' must name a compress target or 'dense' (or be a "
                               f"list of them), got {target!r}")
        prompt_steps[str(name)] = PromptStep(spec["target"], from_dict(PromptConfig, spec.get("config") or {}, where=f"{at}.config"))
    eval_config = from_dict(EvalConfig, data.get("eval") or {}, where=f"{where}: eval")
    if len(eval_config.ppl) != 1:
        raise CTPError(f"{where}: eval.ppl: a recipe evaluates one test set, got {eval_config.ppl}")
    return Recipe(
        model=data["model"],
        workdir=Path(data.get("workdir") or "ctp-run"),
        compress=compress_steps,
        prompts=prompt_steps,
        eval=eval_config,
        source=where,
    )


def load_recipe(path: str | Path, sets: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file (``demo`` names the packaged demo recipe)."""
    path = Path(path)
    if not path.exists() and (PACKAGED / f"{path.name}.yaml").exists():
        path = PACKAGED / f"{path.name}.yaml"
    if not path.exists():
        raise CTPError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CTPError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CTPError(f"recipe {path} cannot be read: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise CTPError(f"{path}: a recipe must be a mapping, got a {type(data).__name__}")
    return parse_recipe(apply_sets(data, sets or [], str(path)), str(path))


def _done_prompt(folder: Path, config: PromptConfig, targets: list[str]) -> bool:
    """Finished with these settings on these very targets (same folders, same compressions)."""
    made = read_prompt_meta(folder)
    if not made:
        return False
    records = made.get("targets") or [made]
    try:  # settings a prompt was made before were added take their defaults
        recorded = to_dict(from_dict(PromptConfig, made.get("prompt_config") or {}))
    except CTPError:
        return False
    # where the teacher's cache lives changes nothing
    if {**recorded, "teacher_cache": None} != {**to_dict(config), "teacher_cache": None} \
            or len(records) != len(targets):
        return False
    for record, target in zip(records, targets):
        target_meta = read_compression_meta(target) if Path(target).is_dir() else None
        compression = target_meta["compression"] if target_meta is not None else None
        if record.get("model") != target or record.get("compression") != compression:
            return False
    return True


def run_recipe(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Run (or finish) a recipe: compress every target, tune every prompt, evaluate every prompt
    on every model. Returns the transfer result, also written to ``workdir/results``."""
    from .evaluation.transfer import load_transfer, transfer, write_transfer

    models: dict[str, str] = {}
    for name, config in recipe.compress.items():
        folder = recipe.workdir / "models" / name
        if is_complete(folder, config):
            log.info("compress %s: done already, skipping", name)
        else:
            log.info("compress %s -> %s", name, folder)
            compress(recipe.model, config, folder, overwrite=True, progress=progress)
        models[name] = str(folder)
    prompts: dict[str, str] = {}
    for name, step in recipe.prompts.items():
        folder = recipe.workdir / "prompts" / name
        if step.config.teacher_cache and not Path(step.config.teacher_cache).is_absolute():
            # a recipe's teacher cache lives in its workdir (one per study, shared by its cells)
            step = PromptStep(step.target, dataclasses.replace(
                step.config, teacher_cache=str(recipe.workdir / step.config.teacher_cache)))
        targets = [recipe.model if t == "dense" else models[t] for t in step.targets]
        if _done_prompt(folder, step.config, targets):
            log.info("tune-prompt %s: done already, skipping", name)
        else:
            resume = resumable(folder, step.config)
            log.info("tune-prompt %s on %s -> %s%s", name, " & ".join(step.targets), folder,
                     " (resuming)" if resume else "")
            tune_prompt(targets if len(targets) > 1 else targets[0], step.config, folder,
                        overwrite=True, resume=resume, progress=progress)
        prompts[name] = str(folder)
    if not prompts or not models:
        return {"models": models, "prompts": prompts}
    key = _evaluation_key(recipe, models, prompts)
    results = recipe.workdir / "results"
    if (results / "transfer.json").exists() and load_transfer(results).get("recipe_key") == key:
        log.info("evaluation: done already, skipping")
        return load_transfer(results)
    result = transfer(list(prompts.values()), list(models.values()), data=recipe.eval.ppl[0],
                      split=recipe.eval.split, seqlen=recipe.eval.seqlen, dense=recipe.model,
                      max_windows=recipe.eval.max_windows, batch_size=recipe.eval.batch_size,
                      device=str(resolve_device(recipe.eval.device)), bos=recipe.eval.bos,
                      progress=progress, cache=recipe.workdir / "cells.jsonl")
    result["recipe_key"] = key
    write_transfer(result, results, overwrite=True)
    return result


def _evaluation_key(recipe: Recipe, models: dict[str, str], prompts: dict[str, str]) -> str:
    """A hash of everything the evaluation depends on, so a finished one is not redone."""
    parts = {"eval": to_dict(recipe.eval), "model": recipe.model,
             "models": {n: read_compression_meta(f, required=True)["compression"] for n, f in models.items()},
             "prompts": {n: read_prompt_meta(f)["best_val_ppl"] for n, f in prompts.items()}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
