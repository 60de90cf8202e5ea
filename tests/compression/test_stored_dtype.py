"""A CPU compression holds the model in its stored dtype and computes one decoder layer at a time
in float32: the result equals what holding the whole model in float32 gave (the earlier way)."""

from __future__ import annotations

import pytest
import torch

from conftest import calib_ids


@pytest.mark.parametrize("config", [dict(prune="wanda", quant="nf4", rounding="rtn"),
                                    dict(prune="sparsegpt", quant="nf4", rounding="obs"),
                                    dict(prune="magnitude", quant="none")])
def test_holding_fp16_computes_what_holding_fp32_computed(tiny_dir, config, monkeypatch):
    """The same float32 arithmetic on the same values (fp16 -> fp32 is exact), so the same result,
    exactly: every decoder weight (dequantized) and every other parameter. While the fp16 model
    is compressed, at most one decoder layer is in float32."""
    import ctp.compression.calibrate as calibrate
    import ctp.compression.pipeline as pipeline
    from ctp import CompressConfig
    from ctp.compression.prune import decoder_linears
    from ctp.compression.quantize import dense_weight
    from ctp.models import decoder_layers

    folder = str(tiny_dir("llama"))  # saved in fp16
    cfg = CompressConfig(device="cpu", **config)
    ids = calib_ids(8, 32, seed=3)
    held, in_fp32 = [], []
    load, run = pipeline.load_model, calibrate.run_layer

    def keep(*args, **kwargs):
        held.append(load(*args, **kwargs))
        return held[-1]

    def spy(layer, *args, **kwargs):
        in_fp32.append(sum(any(p.dtype == torch.float32 for p in l.parameters())
                           for l in decoder_layers(held[-1])))
        return run(layer, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_model", keep)
    monkeypatch.setattr(calibrate, "run_layer", spy)
    now = pipeline.compress(folder, cfg, calibration=ids, progress=False).model
    assert held[-1].get_input_embeddings().weight.dtype == torch.float16 or cfg.quant == "none"
    assert not in_fp32 or max(in_fp32) == 1
    # before: the whole model loaded in float32 (what pipeline._load asked for on a CPU)
    monkeypatch.setattr(pipeline, "load_model", lambda name, dtype=None, **kw: load(name, dtype=torch.float32, **kw))
    before = pipeline.compress(folder, cfg, calibration=ids, progress=False).model
    a, b = decoder_linears(now), decoder_linears(before)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(dense_weight(a[name]).float(), dense_weight(b[name]).float()), name
    for (name, p), (_, q) in zip(now.named_parameters(), before.named_parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), name


def test_cast_parameters_return_into_their_own_storage():
    """A layer's parameters go to float32 for the work and come back rounded into the very tensors
    they held (no second copy of the checkpoint beside memory-mapped pages); a parameter whose
    module was replaced meanwhile is left alone."""
    from ctp.compression.calibrate import cast_parameters_, restore_parameters_

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).half()
    before = {n: (p.data, p.data.data_ptr()) for n, p in layer.named_parameters()}
    held = cast_parameters_(layer, torch.float32)
    assert set(held) == set(before) and all(p.dtype == torch.float32 for p in layer.parameters())
    new = torch.randn(8, 8)
    layer[0].weight.data.copy_(new)  # what pruning does to the float32 copy
    restore_parameters_(layer, held)
    for name, param in layer.named_parameters():
        assert param.dtype == torch.float16 and param.data.data_ptr() == before[name][1]
    assert torch.equal(layer[0].weight, new.half())  # rounded to the held dtype, as .to() rounds

    held = cast_parameters_(layer, torch.float32)
    kept = held["0.weight"].clone()
    layer[0] = torch.nn.Identity()  # replaced (by a quantized module, in the pipeline)
    restore_parameters_(layer, held)
    assert torch.equal(held["0.weight"], kept) and layer[1].weight.dtype == torch.float16
