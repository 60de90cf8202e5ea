"""Quantization after pruning: zeros survive, odd sizes are handled, checkpoints reload alone."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import calib_ids, tiny_model
from ctp.compression.pipeline import compress
from ctp.compression.prune import decoder_linears
from ctp.compression.quantize import dense_weight
from ctp.config import CompressConfig


@pytest.mark.parametrize("quant,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("int8", False)])
def test_pruned_zeros_survive_quantization(tmp_path, quant, double_quant):
    model = tiny_model("llama")
    # the naive magnitude mask, computed here from the original weights
    expected = {}
    for name, lin in decoder_linears(model).items():
        w = lin.weight.detach().half().float().abs()  # saved in fp16 before quantizing
        k = int(w.numel() * 0.5)
        flat = torch.zeros(w.numel(), dtype=torch.bool)
        flat[torch.sort(w.flatten(), stable=True).indices[:k]] = True
        expected[name] = flat.view_as(w)
    model.half()
    config = CompressConfig(prune="magnitude", sparsity=0.5, quant=quant, double_quant=double_quant)
    result = compress(model, config, tmp_path / "out", progress=False)
    for name, module in decoder_linears(result.model).items():
        w = dense_weight(module)
        # the very |w| values and the same tie rule (earlier position first): nothing is summed
        # or rounded on the way, so the masks are equal, not merely close
        assert torch.equal(w == 0, expected[name]), name
        assert w[~expected[name]].abs().min() > 0
    assert result.report["sparsity"]["overall"] == 0.5


def test_layers_bitsandbytes_cannot_run_on_cpu_stay_unquantized(tmp_path, caplog):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=80,
                            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    result = compress(model, CompressConfig(prune="magnitude", quant="nf4"), tmp_path / "out", progress=False)
    skipped = result.report["unquantized_modules"]
    assert "model.layers.0.mlp.gate_proj" in skipped and "model.layers.0.mlp.up_proj" in skipped
    assert "model.layers.0.mlp.down_proj" in skipped  # in_features 80 is not a multiple of 64
    assert "model.layers.0.self_attn.q_proj" not in skipped
    assert "not a multiple of 32x64" in caplog.text
    with torch.no_grad():  # inference on CPU must not crash
        out = result.model(input_ids=calib_ids(1, 16)).logits
    assert torch.isfinite(out).all()


# Run in a fresh process with this process's thread count, so that it is the very computation
# done here (the same kernels on the same shapes split the same way): equal to the bit.
RELOAD = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[4]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
state = {k: v.contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
for module in model.modules():  # bitsandbytes' own switch: no bfloat16 repacking on this CPU
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    logits = model(input_ids=ids).logits
assert not any(m == "ctp" or m.startswith("ctp.") for m in sys.modules), "ctp was imported"
save_file({"logits": logits.float().contiguous(), **{"state." + k: v for k, v in state.items()}},
          sys.argv[3])
"""


@pytest.mark.parametrize("quant,rounding", [("nf4", "rtn"), ("int8", "rtn"), ("none", "rtn"),
                                            ("nf4", "obs"), ("int8", "obs")])
def test_fresh_process_reload_without_ctp_gives_identical_logits(tmp_path, tiny_dir, quant, rounding):
    from safetensors.torch import load_file

    ids = calib_ids(4, 32)
    result = compress(str(tiny_dir("llama")), CompressConfig(prune="wanda", quant=quant, rounding=rounding),
                      tmp_path / "out", calibration=ids, progress=False)
    probe = calib_ids(2, 24, seed=1)
    with torch.no_grad():
        expected = result.model(input_ids=probe).logits.float()
    torch.save(probe, tmp_path / "ids.pt")
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.safetensors"), str(torch.get_num_threads())],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reloaded = load_file(str(tmp_path / "logits.safetensors"))
    assert torch.equal(reloaded["logits"], expected)
    ours = {k: v for k, v in result.model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert set(ours) == {k[len("state."):] for k in reloaded if k.startswith("state.")}
    for key, value in ours.items():  # the very modules and tensors from_pretrained builds
        assert torch.equal(value, reloaded["state." + key]), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ("quantization_config" in config) == (quant != "none")


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_prompt_gradient_through_quantized_model_matches_its_dense_twin(tmp_path, quant):
    """bitsandbytes repacks 4-bit CPU weights on the first no-grad eval forward and then drops
    gradients (zero prompt gradient, silently). Models loaded by ctp must never do that: after
    an eval forward, the gradient equals the one through a dense model with the same weights."""
    from ctp.lm import token_nlls
    from ctp.models import load_any

    compress(tiny_model("llama").half(), CompressConfig(prune="magnitude", quant=quant),
             tmp_path / "out", progress=False)
    quantized = load_any(str(tmp_path / "out"))
    ids = calib_ids(2, 24, seed=2)
    if quant == "nf4":  # the control: loaded plainly, this CPU's repacking does zero the gradient
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        with torch.no_grad():
            plain(input_ids=ids)
        for p in plain.parameters():
            p.requires_grad_(False)
        control = torch.nn.Parameter(torch.randn(3, 64) * 0.1)
        token_nlls(plain, ids, control).mean().backward()
        if control.grad is not None and control.grad.any():
            pytest.skip("this CPU's bitsandbytes does not repack 4-bit weights: nothing to guard")
    with torch.no_grad():
        quantized(input_ids=ids)  # an inference pass first, as evaluation before training does
    twin = tiny_model("llama")
    q_modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            source = q_modules[name]
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dense_weight(source))
            elif hasattr(module, "weight") and isinstance(module.weight, torch.nn.Parameter):
                module.weight.copy_(source.weight.float())
    grads = []
    for model in (quantized, twin):
        for p in model.parameters():
            p.requires_grad_(False)
        prompt = torch.nn.Parameter(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 0.1)
        token_nlls(model, ids, prompt).mean().backward()
        grads.append(prompt.grad)
    assert grads[0].abs().sum() > 0
    if quant == "nf4":  # same arithmetic as the twin
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    else:  # LLM.int8 also quantizes activations in the forward pass: close, not equal
        assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 0.05
