"""Issue-9 guarantees of prompt training: real gradient checkpointing with dropout off, a float32
prompt under 16-bit autocast, and validation that `ctp eval` reproduces."""

import contextlib

import pytest
import torch

from conftest import tiny_model
from ctp.config import PromptConfig
from ctp.head import output_head
from ctp.lm import token_nlls
from ctp.models import checkpoint_layers, decoder_layers
from ctp.prompt.tune import tune_prompt


def ids_of(n, seed=0, vocab=50):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def prompt_grad(model, batch, prompt, checkpointing):
    prompt = torch.nn.Parameter(prompt.clone())
    calls = []
    # pre-hooks: a recomputation stops as soon as the last saved tensor is rebuilt, before a
    # module's forward hooks would fire
    hooks = [(layer.mlp if hasattr(layer, "mlp") else layer.fc1).register_forward_pre_hook(
             lambda *a: calls.append(1)) for layer in decoder_layers(model)]
    with checkpoint_layers(model) if checkpointing else contextlib.nullcontext():
        token_nlls(model, batch, prompt).mean().backward()
    for h in hooks:
        h.remove()
    return prompt.grad, len(calls)


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt_neox"])
def test_checkpointing_gives_the_same_gradient_and_recomputes_each_layer(arch):
    model = tiny_model(arch)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = ids_of(64, 3).view(2, 32)
    prompt = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    output_head(model)  # its one-time check against the model's own logits runs the layers too
    plain, plain_calls = prompt_grad(model, batch, prompt, checkpointing=False)
    ckpt, ckpt_calls = prompt_grad(model, batch, prompt, checkpointing=True)
    layers = len(decoder_layers(model))
    # every layer runs twice per step (once over the prompt, building its keys and values, once
    # over the batch after them); checkpointing runs them again in the backward pass -- all but
    # those whose output no gradient needs (the last layer's MLP over the prompt feeds no key or
    # value; a non-reentrant recomputation stops once the tensors it must rebuild are rebuilt)
    assert plain_calls == 2 * layers and 2 * plain_calls - 1 <= ckpt_calls <= 2 * plain_calls
    assert ((ckpt - plain).norm() / plain.norm()).item() <= 1e-5
    assert all(type(layer).forward is layer.forward.__func__ for layer in decoder_layers(model))


def test_training_keeps_dropout_off_even_with_checkpointing(tmp_path):
    model = tiny_model("opt")  # OPT's config has dropout 0.1
    assert model.config.dropout > 0
    seen_training = []
    for module in model.modules():
        module.register_forward_pre_hook(lambda m, a: seen_training.append(m.training))
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=4, lr=0.05, seqlen=32, batch_size=2, eval_every=2,
                          eval_windows=4, gradient_checkpointing=True)
    result = tune_prompt(model, config, tmp_path / "p", train_ids=ids_of(3000), val_ids=ids_of(600, 1),
                         progress=False)
    assert seen_training and not any(seen_training)
    assert result.meta["gradient_checkpointing"] is True
    again = tune_prompt(tiny_model("opt"), PromptConfig(**{**config.__dict__, "gradient_checkpointing": False}),
                        train_ids=ids_of(3000), val_ids=ids_of(600, 1), progress=False)
    assert again.meta["history"]["train_loss"] == pytest.approx(result.meta["history"]["train_loss"], abs=1e-6)
    with_dropout = tune_prompt(tiny_model("opt"), PromptConfig(**{**config.__dict__, "dropout": True}),
                               train_ids=ids_of(3000), val_ids=ids_of(600, 1), progress=False)
    assert with_dropout.meta["history"]["train_loss"] != pytest.approx(result.meta["history"]["train_loss"],
                                                                       abs=1e-6)


def test_prompt_stays_float32_under_bf16_autocast_of_a_16bit_model():
    """A float16 model under bfloat16 autocast: the prompt's gradient is float32 and close to
    the float32 model's, not rounded through a float16 copy of the prompt."""
    half = tiny_model("llama").half()
    full = tiny_model("llama")
    batch = ids_of(64, 2).view(2, 32)
    prompt = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    grads = []
    for model, autocast in ((full, False), (half, True)):
        for p in model.parameters():
            p.requires_grad_(False)
        param = torch.nn.Parameter(prompt.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            nll = token_nlls(model, batch, param)
        nll.mean().backward()
        grads.append(param.grad)
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 0.05
    assert not torch.equal(grads[1], grads[1].half().float())  # not through a float16 copy
    # the same prompt rounded to float16 first gives exactly a float16-representable gradient
    # path; ours must not: its embedding input is float32
    captured = []
    handle = decoder_layers(half)[0].register_forward_pre_hook(
        lambda m, a, k: captured.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        token_nlls(half, batch, torch.nn.Parameter(prompt.clone()))
    handle.remove()
    assert captured[0].dtype == torch.float32
    assert torch.equal(captured[0][0, :4], prompt)  # the very values, not a 16-bit rounding


def test_best_val_ppl_is_what_ctp_eval_measures_even_under_autocast(tmp_path, tiny_dir):
    """Training under bf16 autocast; validation is evaluation: the kept prompt's recorded
    validation perplexity equals ctp's perplexity of that prompt on the same windows."""
    from ctp.evaluation.perplexity import perplexity_of_ids
    from ctp.lm import spread_windows
    from ctp.models import load_any

    model_dir = str(tiny_dir("llama"))
    val = ids_of(32 * 40, 1)
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=4, lr=0.05, seqlen=32, batch_size=2, eval_every=2,
                          eval_windows=8, precision="bf16")
    result = tune_prompt(model_dir, config, tmp_path / "p", train_ids=ids_of(3000), val_ids=val,
                         progress=False)
    windows = spread_windows(val, 32, 8)
    # validation's own batch size: the very computation it made (rel: the last digits of a sum)
    measured = perplexity_of_ids(load_any(model_dir), windows.flatten(), 32, prompt=result.prompt,
                                 batch_size=config.batch_size)
    assert result.meta["best_val_ppl"] == pytest.approx(measured.ppl, rel=1e-9)
