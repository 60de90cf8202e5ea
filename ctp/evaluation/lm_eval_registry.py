"""Make ``--model ctp`` / ``lm_eval.simple_evaluate(model="ctp")`` resolve, cheaply.

lm-eval 0.4.13 discovers no plugins, so ``import ctp`` calls :func:`register`: it adds a lazy
placeholder to lm-eval's registry (about 50 ms, torch not imported), and the plugin itself
(torch, transformers) loads only when lm-eval asks for ``ctp``.
"""

from __future__ import annotations

PLUGIN = "ctp.evaluation.lm_eval_plugin:CTPLM"


def register() -> bool:
    """Register the plugin under ``ctp`` (idempotent); False when lm-eval is not usable here."""
    try:
        # lm-eval's own models first: it adds them only to an empty registry
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError:  # lm-eval missing or broken: the rest of ctp works without it
        return False
    if "ctp" not in model_registry:
        model_registry.register("ctp", target=PLUGIN)
    return True
