"""Loading: the compute dtype a 4-bit checkpoint runs in is chosen by the machine that loads it."""

import torch

from ctp.config import CompressConfig


def test_a_checkpoint_compressed_on_a_cpu_computes_in_bf16_when_loaded_for_a_gpu(tmp_path, tiny_dir):
    """The float32 compute dtype a CPU compression stores is the CPU's choice; a model made ready
    for a GPU multiplies in bfloat16 (checked without a GPU: the attributes bitsandbytes reads)."""
    from transformers import AutoModelForCausalLM

    from ctp.compression.pipeline import compress
    from ctp.runtime import ready_for_device_

    compress(str(tiny_dir("llama")), CompressConfig(prune="magnitude", quant="nf4", device="cpu"),
             tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    linears = [m for m in model.modules() if hasattr(m, "compute_dtype") and m.compute_dtype is not None]
    assert linears and {m.compute_dtype for m in linears} == {torch.float32}  # what the CPU stored
    ready_for_device_(model, torch.device("cuda"), None)
    assert {m.compute_dtype for m in linears} == {torch.bfloat16}
    assert {m.weight.quant_state.dtype for m in linears} == {torch.bfloat16}
    ready_for_device_(model, torch.device("cpu"), None)
    assert {m.compute_dtype for m in linears} == {torch.float32}
