"""ctp: compress a causal LM (prune + 4-bit), then win its quality back with a soft prompt.

The public API is imported lazily so that ``import ctp`` stays fast and light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "compress": "ctp.compression.pipeline",
    "CompressResult": "ctp.compression.pipeline",
    "prune_": "ctp.compression.layers",
    "perplexity": "ctp.evaluation.api",
    "evaluate": "ctp.evaluation.api",
    "load_compressed": "ctp.models",
    "load_any": "ctp.models",
    "tune_prompt": "ctp.prompt.tune",
    "TuneResult": "ctp.prompt.tune",
    "load_prompt_embeddings": "ctp.artifacts",
    "stitch": "ctp.prompt.stitch",
    "transfer": "ctp.evaluation.transfer",
    "generate": "ctp.generation",
    "load_recipe": "ctp.recipe",
    "run_recipe": "ctp.recipe",
    "PromptConfig": "ctp.config",
    "CompressConfig": "ctp.config",
    "EvalConfig": "ctp.config",
    "CTPError": "ctp.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'ctp' has no attribute {name!r}")


def _register_with_lm_eval() -> None:
    from .evaluation.lm_eval_registry import register

    register()


_register_with_lm_eval()
