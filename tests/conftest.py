"""Shared fixtures: tiny random models of every supported family, saved with a real tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CTP_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "ctp" / "assets" / "embedded-llama"
VOCAB = 2048  # the embedded tokenizer's vocabulary; tiny models share it so CLI paths work


def tiny_config(arch: str):
    """A two-layer, hidden-64 config of ``arch`` (sizes multiples of 32 for bitsandbytes)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        return cls(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, rotary_pct=0.5, **common)
    if arch == "phi":
        return tf.PhiConfig(hidden_size=64, intermediate_size=128, partial_rotary_factor=0.5, **common)
    raise KeyError(arch)


ARCH_NAMES = ["llama", "mistral", "qwen2", "opt", "gpt_neox", "phi"]


def tiny_model(arch: str = "llama", seed: int = 0):
    """A random tiny causal LM in float32, eval mode, weights drawn with ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    # Default inits give near-identical weights per row; widen them so scores differ clearly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EMBEDDED)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """Save tiny models (fp16 on disk, like real checkpoints) with the embedded tokenizer."""
    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            tiny_model(arch).half().save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


def linear_inputs(model, layer, ids) -> dict:
    """Run the WHOLE model on ``ids`` and return every Linear input of ``layer`` as
    ``{name: [tokens, in_features]}`` -- the naive way references see calibration data."""
    from torch import nn

    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    inputs = {n: [] for n in linears}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs[n].append(a[0].detach()))
             for n, m in linears.items()]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]) for n, xs in inputs.items()}


def calib_ids(nsamples: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[nsamples, seqlen]``."""
    return torch.randint(0, VOCAB, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None):
    """Run ``python -m ctp.cli ARGS`` in a subprocess; return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ctp.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=600)
