"""ctp: compress a causal LM (prune + 4-bit), then win its quality back with a soft prompt.

The public API is imported lazily so that ``import ctp`` stays fast and light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "compress": "ctp.compress.pipeline",
    "CompressResult": "ctp.compress.pipeline",
    "prune_": "ctp.compress.prune",
    "perplexity": "ctp.evaluate.api",
    "evaluate": "ctp.evaluate.api",
    "load_compressed": "ctp.models",
    "load_any": "ctp.models",
    "tune_prompt": "ctp.prompt.tune",
    "TuneResult": "ctp.prompt.tune",
    "load_prompt_embeddings": "ctp.prompt.artifact",
    "stitch": "ctp.prompt.stitch",
    "transfer": "ctp.evaluate.transfer",
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
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ctp' has no attribute {name!r}")


def _register_with_lm_eval() -> None:
    """Let ``lm_eval.simple_evaluate(model="ctp")`` and ``--model ctp`` find the plugin.

    lm-eval 0.4.13 discovers no plugins, so ``import ctp`` registers a lazy placeholder: the
    registry imports in ~50 ms without torch, and the plugin (torch, transformers) loads only when
    lm-eval asks for ``ctp``. lm-eval's own models must be imported first: it adds them only to an
    empty registry.
    """
    try:
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError:  # lm-eval missing or broken: the rest of ctp works without it
        return
    if "ctp" not in model_registry:
        model_registry.register("ctp", target="ctp.evaluate.lm_eval_plugin:CTPLM")


_register_with_lm_eval()
