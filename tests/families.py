"""Tiny random configs of every decoder-only family ctp is tested on (two layers, hidden 64).

Sizes are multiples of 32 so bitsandbytes' CPU kernels take every Linear; the vocabulary is the
embedded tokenizer's, so CLI paths work with a real tokenizer. Each family keeps what makes it
different switched on: Gemma's scaled embeddings and BOS, Gemma 2/3's sliding windows and
soft-capping, Cohere's logit scale, Granite's multipliers, partial rotary, fused projections,
biases, QK norms.
"""

from __future__ import annotations

import torch

VOCAB = 2048

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
            "opt", "gpt_neox", "granite", "olmo2", "cohere", "starcoder2", "stablelm"]


def family_config(family: str):
    """A two-layer, hidden-64 config of ``family``."""
    from transformers import AutoConfig

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    special: dict = {
        "llama": dict(intermediate_size=128, num_key_value_heads=2),
        "mistral": dict(intermediate_size=128, num_key_value_heads=2, sliding_window=None),
        "qwen2": dict(intermediate_size=128, num_key_value_heads=2),
        "qwen3": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "gemma": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "gemma2": dict(intermediate_size=128, num_key_value_heads=2, head_dim=32, sliding_window=8,
                       final_logit_softcapping=3.0, attn_logit_softcapping=5.0,
                       query_pre_attn_scalar=16),
        "gemma3_text": dict(intermediate_size=128, num_key_value_heads=1, head_dim=32, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"],
                            final_logit_softcapping=3.0, query_pre_attn_scalar=32),
        "phi": dict(intermediate_size=128, partial_rotary_factor=0.5),
        "phi3": dict(intermediate_size=128, num_key_value_heads=2),
        "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
        "gpt_neox": dict(intermediate_size=128, rotary_pct=0.5),
        "granite": dict(intermediate_size=128, num_key_value_heads=2, embedding_multiplier=4.0,
                        residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=3.0),
        "olmo2": dict(intermediate_size=128, num_key_value_heads=2),
        "cohere": dict(intermediate_size=128, num_key_value_heads=2, logit_scale=0.5),
        "starcoder2": dict(intermediate_size=128, num_key_value_heads=2, sliding_window=None),
        "stablelm": dict(intermediate_size=128, num_key_value_heads=2, partial_rotary_factor=0.25),
    }[family]
    return AutoConfig.for_model(family, **common, **special)


def family_model(family: str, seed: int = 0):
    """A random tiny causal LM of ``family`` in float32, eval mode, weights drawn with ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family), dtype=torch.float32)
    with torch.no_grad():  # default inits give near-identical rows; widen them
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model.eval()
