"""The CUDA path on tiny models: compression, bf16 prompt training with gradient checkpointing,
evaluation, stitching and the lm-eval plugin, each against the CPU result.

Marked ``gpu`` (deselected by default; ``pytest -m gpu``) and skipped cleanly without CUDA.
"""

import math

import pytest
import torch

from conftest import calib_ids, tiny_model
from ctp.config import CompressConfig, PromptConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def ids_of(n, seed=0, vocab=50):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_dir):
    """The same tiny base compressed on the GPU and on the CPU (Wanda 50% + NF4)."""
    from ctp.compression.pipeline import compress

    root = tmp_path_factory.mktemp("gpu")
    base = str(tiny_dir("llama"))
    ids = calib_ids(8, 64)
    out = {}
    for device in ("cuda", "cpu"):
        config = CompressConfig(prune="wanda", quant="nf4", device=device)
        out[device] = compress(base, config, root / device, calibration=ids, progress=False)
    out["base"] = base
    return out


def test_compress_on_cuda_matches_the_cpu_masks_and_reloads(compressed):
    from transformers import AutoModelForCausalLM

    from ctp.compression.prune import decoder_linears
    from ctp.compression.quantize import dense_weight

    gpu, cpu = compressed["cuda"], compressed["cpu"]
    assert gpu.report["device"].startswith("cuda") and gpu.report["peak_memory"]["gpu_peak_allocated_bytes"] > 0
    assert gpu.report["sparsity_after_pruning"]["overall"] == cpu.report["sparsity_after_pruning"]["overall"] == 0.5
    ours = decoder_linears(gpu.model)
    theirs = decoder_linears(AutoModelForCausalLM.from_pretrained(gpu.out, device_map={"": 0}))
    same_mask = 0.0
    for name, module in decoder_linears(cpu.model).items():
        a, b = dense_weight(ours[name].to("cuda")).cpu(), dense_weight(module).cpu()
        assert torch.equal(dense_weight(theirs[name]).cpu(), a), name  # what from_pretrained loads
        same_mask += ((a == 0) == (b == 0)).float().mean().item() / len(ours)
    assert same_mask > 0.99  # fp16 calibration on the GPU vs fp32 on the CPU: near-ties may flip


@pytest.mark.parametrize("prune,quant", [("magnitude", "int8"), ("magnitude", "nf4"), ("sparsegpt", "nf4")])
def test_compress_on_cuda_other_methods(tmp_path, tiny_dir, prune, quant):
    from ctp.compression.pipeline import compress

    config = CompressConfig(prune=prune, quant=quant, device="cuda", rounding="obs" if prune == "sparsegpt" else "rtn")
    result = compress(str(tiny_dir("llama")), config, tmp_path / "out", calibration=calib_ids(4, 64),
                      progress=False)
    assert result.report["sparsity_after_pruning"]["overall"] == 0.5
    with torch.no_grad():
        logits = result.model.to("cuda")(input_ids=calib_ids(1, 16).cuda()).logits
    assert torch.isfinite(logits).all()
    if prune == "magnitude":  # a data-independent mask: exactly the CPU's
        from ctp.compression.prune import decoder_linears
        from ctp.compression.quantize import dense_weight

        cpu = compress(str(tiny_dir("llama")), CompressConfig(prune=prune, quant=quant, device="cpu"),
                       tmp_path / "cpu", progress=False)
        theirs = decoder_linears(cpu.model)
        for name, module in decoder_linears(result.model).items():
            assert torch.equal(dense_weight(module).cpu() == 0, dense_weight(theirs[name]) == 0), name


def test_a_cpu_compressed_checkpoint_runs_bf16_matmuls_on_the_gpu(compressed):
    from ctp.models import load_any

    model = load_any(str(compressed["cpu"].out), device="cuda")
    dtypes = {m.compute_dtype for m in model.modules() if hasattr(m, "compute_dtype") and m.compute_dtype}
    assert dtypes == {torch.bfloat16}


def test_tune_prompt_bf16_with_checkpointing_learns_and_matches_an_fp32_gradient(compressed, tmp_path):
    from ctp.lm import token_nlls
    from ctp.models import load_any
    from ctp.prompt.tune import tune_prompt

    folder = str(compressed["cuda"].out)
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=30, lr=0.05, seqlen=64, batch_size=4, eval_every=10,
                          eval_windows=8, warmup_steps=0, device="cuda")
    result = tune_prompt(folder, config, tmp_path / "p", train_ids=ids_of(8000), val_ids=ids_of(2000, 1),
                         progress=False)
    assert result.meta["gradient_checkpointing"] is True  # the default on a GPU
    h = result.meta["history"]
    assert sum(h["train_loss"][-5:]) / 5 < sum(h["train_loss"][:5]) / 5
    model = load_any(folder, device="cuda")
    for p in model.parameters():
        p.requires_grad_(False)
    batch = ids_of(256, 2).view(4, 64).cuda()
    grads = []
    for autocast in (True, False):
        prompt = torch.nn.Parameter(result.prompt.clone().cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            token_nlls(model, batch, prompt).mean().backward()
        grads.append(prompt.grad)
    assert not torch.equal(grads[0], grads[0].bfloat16().float())  # not through a 16-bit prompt
    assert ((grads[0] - grads[1].float()).norm() / grads[1].float().norm()).item() < 0.05


def test_eval_on_cuda_equals_the_cpu_with_and_without_a_prompt(compressed, tmp_path):
    from ctp.config import EvalConfig
    from ctp.evaluation.api import evaluate

    prompt = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    folder = str(compressed["cuda"].out)
    for p in (None, prompt):
        got = {d: evaluate(folder, EvalConfig(ppl=["embedded"], max_windows=4, seqlen=128, device=d),
                           prompt=p, progress=False)["ppl"]["embedded"] for d in ("cuda", "cpu")}
        assert math.isfinite(got["cuda"]) and got["cuda"] == pytest.approx(got["cpu"], rel=2e-2)


def test_stitch_on_cuda_equals_the_cpu(compressed, tmp_path, capfd):
    import json

    from ctp.cli import main
    from ctp.prompt.tune import tune_prompt

    tune_prompt(str(compressed["cpu"].out), PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=2, seqlen=32, batch_size=2,
                                                        eval_every=2, eval_windows=2, device="cpu"),
                tmp_path / "p", train_ids=ids_of(3000), val_ids=ids_of(600, 1), progress=False)
    reports = {}
    for device in ("cuda", "cpu"):
        capfd.readouterr()
        assert main(["stitch", str(tmp_path / "p"), str(compressed["cuda"].out), "--ppl", "embedded",
                     "--max-windows", "2", "--device", device, "--json", "--no-progress"]) == 0
        reports[device] = json.loads(capfd.readouterr().out)["ppl"]
    for key in ("with_prompt", "without_prompt"):
        assert reports["cuda"][key]["embedded"] == pytest.approx(reports["cpu"][key]["embedded"], rel=2e-2)


def test_lm_eval_plugin_on_cuda_equals_the_cpu(compressed):
    from lm_eval.api.instance import Instance

    from ctp.evaluation.lm_eval_plugin import CTPLM

    requests = [Instance("loglikelihood", {}, ("The model", " is small"), 0),
                Instance("loglikelihood", {}, ("Compress", ", then prompt"), 1)]
    generate = [Instance("generate_until", {}, ("The model", {"until": ["\n"], "max_gen_toks": 6}), 0)]
    from ctp.prompt.tune import tune_prompt

    prompt = tune_prompt(str(compressed["cpu"].out), PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=2, seqlen=32,
                                                                 batch_size=2, eval_every=2, eval_windows=2,
                                                                 device="cpu"),
                         compressed["cpu"].out.parent / "lm-eval-prompt", train_ids=ids_of(3000),
                         val_ids=ids_of(600, 1), progress=False).out
    scores, texts = {}, {}
    for device in ("cuda", "cpu"):
        lm = CTPLM(pretrained=str(compressed["cuda"].out), prompt=str(prompt), device=device, batch_size=2)
        scores[device] = [s for s, _ in lm.loglikelihood(requests)]
        texts[device] = lm.generate_until(generate)
    assert scores["cuda"] == pytest.approx(scores["cpu"], abs=0.05)
    # bf16 GPU matmuls against fp32: greedy texts agree unless a near-tie flips a token
    assert texts["cuda"][0][:3] == texts["cpu"][0][:3]
