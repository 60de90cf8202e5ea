"""The lm-eval plugin (``--model ctp``): numbers equal lm-eval's own ``hf`` model with ``peft=``
and naive computations written here; batching changes nothing; the CLI writes lm-eval's results."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from lm_eval.api.instance import Instance

from ctp.compression.pipeline import compress
from ctp.config import CompressConfig, PromptConfig
from ctp.errors import CTPError
from ctp.evaluation.lm_eval_plugin import CTPLM, register
from ctp.models import load_any, load_tokenizer
from ctp.artifacts import load_prompt_embeddings
from ctp.prompt.tune import tune_prompt
from ties import GREEDY_ATOL, GREEDY_FLIPS, TieBudget

TASKS = REPO / "tests" / "data" / "lm_eval_tasks"
PAIRS = [("Numbers: one, two,", " three"), ("import numpy as", " np"), ("x", " = 1 + 2"),
         ("def add(a, b):\n    return a + b\n\nprint(add(1, 2)) # prints", " 3, which is right")]
TEXTS = ["Colours: red, orange, yellow, green.", "import torch\nx = torch.zeros(3)"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    """A tiny llama folder, a 4-token prompt tuned on it, and the two harness models."""
    from lm_eval.models.huggingface import HFLM

    model_dir = tiny_dir("llama")
    prompt_dir = tmp_path_factory.mktemp("lm-eval") / "prompt"
    text = torch.randint(0, 2048, (4000,), generator=torch.Generator().manual_seed(0))
    tune_prompt(str(model_dir), PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=3, seqlen=32, batch_size=2,
                                             eval_every=3, eval_windows=4, init="random"),
                prompt_dir, train_ids=text, val_ids=text[:1000], progress=False)
    ctp = CTPLM(pretrained=str(model_dir), prompt=str(prompt_dir), device="cpu", batch_size=4)
    hf = HFLM(pretrained=str(model_dir), peft=str(prompt_dir), device="cpu", dtype="float32",
              batch_size=4)
    return {"model": str(model_dir), "prompt": str(prompt_dir), "ctp": ctp, "hf": hf}


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def naive_logits(model, prompt, ids, first):
    """Logits ``[len(ids) - first, vocab]`` predicting ``ids[first:]``, the prompt prepended by
    hand (its positions unscored)."""
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor([ids]))
        logits = model(inputs_embeds=torch.cat([prompt[None], emb], 1)).logits[0].double()
    n = prompt.shape[0]
    return logits[n + first - 1:n + len(ids) - 1]


def naive_logprob(model, prompt, ids, first):
    """Sum of log p(ids[t]) for t >= first, the prompt prepended by hand (its positions unscored)."""
    logp = naive_logits(model, prompt, ids, first).log_softmax(-1)
    return sum(logp[t - first, ids[t]].item() for t in range(first, len(ids)))


def assert_greedy_flag(flag, model, prompt, ids, first, ties):
    """lm-eval's ``is_greedy`` (every continuation token is the argmax) as the naive logits say,
    but for near-ties: where it differs, a target (or a runner-up) ties with the largest logit."""
    logits = naive_logits(model, prompt, ids, first)
    targets = torch.tensor(ids[first:])
    best = logits.argmax(-1)
    if flag == bool((best == targets).all()):
        return
    if flag:  # every target taken for the argmax: where it is not here, it ties with it
        for row, target in zip(logits[best != targets], targets[best != targets]):
            ties.token(int(target), row, "is_greedy")
    else:  # a target taken for no argmax: a runner-up ties with it somewhere
        others = logits.scatter(1, targets[:, None], -torch.inf)
        i = int((logits.max(-1).values - others.max(-1).values).argmin())
        ties.token(int(others[i].argmax()), logits[i], "is_greedy")


def assert_same_greedy_flags(results, model, prompt, pairs, tok, ties):
    for (_, flag), (context, continuation) in zip(results, pairs):
        ids = tok.encode(context + continuation)
        assert_greedy_flag(flag, model, prompt, ids, len(tok.encode(context)), ties)


@pytest.fixture
def decoded(monkeypatch):
    """The tokens the plugin's greedy decoding chose, by context: ``{context ids: [tokens]}``
    (a later generation of the same context replaces the list)."""
    import ctp.evaluation.lm_eval_plugin as plugin

    seen = {}
    real = plugin.decode

    def recording(model, ids, cache=None, mask=None, **kwargs):
        rows = []
        for i in range(ids.shape[0]):
            row = ids[i] if mask is None else ids[i][mask[i].bool()]
            rows.append(seen.setdefault(tuple(row.tolist()), []))
            rows[-1].clear()
        for chosen in real(model, ids, cache, mask, **kwargs):
            for row, token in zip(rows, chosen.tolist()):
                row.append(token)
            yield chosen

    monkeypatch.setattr(plugin, "decode", recording)
    return seen


def naive_greedy(model, prompt, tok, context, steps, until, follow=None, ties=None):
    """Greedy decoding by full forward passes, no cache, no padding. ``follow``: the tokens
    the plugin chose (:func:`decoded`), each checked by ``ties`` to be the argmax here or a
    near-tie with it and then taken, so that the next step is compared on the same text."""
    ids = tok.encode(context)
    theirs = None if follow is None else follow[tuple(ids)]
    assert theirs is None or theirs, f"the plugin decoded no token for {context!r}"
    new = []
    for t in range(steps):
        with torch.no_grad():
            emb = model.get_input_embeddings()(torch.tensor([ids + new]))
            logits = model(inputs_embeds=torch.cat([prompt[None], emb], 1)).logits[0, -1]
        nxt = (ties.token(theirs[t], logits, f"{context!r} step {t}") if theirs and t < len(theirs)
               else int(logits.argmax()))
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    text = tok.decode(new, skip_special_tokens=True)
    return min((text.split(u)[0] for u in until), key=len)


def greedy_ties(what=""):
    return TieBudget(GREEDY_FLIPS, atol=GREEDY_ATOL, what=what)


def test_scores_equal_hf_peft_and_a_naive_computation(setup):
    lm, hf = setup["ctp"], setup["hf"]
    assert (lm.max_length, hf.max_length) == (256 - 4, 256)  # the prompt's room comes off
    ours, theirs = lm.loglikelihood(requests("loglikelihood", PAIRS)), hf.loglikelihood(requests("loglikelihood", PAIRS))
    model, tok = load_any(setup["model"]), load_tokenizer(setup["model"])
    prompt = load_prompt_embeddings(setup["prompt"])
    naive = [naive_logprob(model, prompt, tok.encode(c + x), len(tok.encode(c))) for c, x in PAIRS]
    ties = greedy_ties("is_greedy")
    for results in (ours, theirs):  # each agrees with the naive logits, ties aside
        assert_same_greedy_flags(results, model, prompt, PAIRS, tok, ties)
    assert max(abs(a[0] - b[0]) for a, b in zip(ours, theirs)) < 1e-4
    assert max(abs(a[0] - b) for a, b in zip(ours, naive)) < 1e-4
    bare = CTPLM(pretrained=setup["model"], device="cpu").loglikelihood(requests("loglikelihood", PAIRS))
    assert max(abs(a[0] - b[0]) for a, b in zip(ours, bare)) > 1e-2  # the prompt is really there
    # rolling: the prefix token (BOS) then every token of the text, each scored once
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    ref = hf.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    naive = [naive_logprob(model, prompt, [lm.prefix_token_id, *tok.encode(t)], 1) for t in TEXTS]
    assert max(abs(a - b) for a, b in zip(rolling, naive)) < 1e-4
    assert max(abs(a - b) for a, b in zip(rolling, ref)) < 1e-4


def test_batching_changes_nothing_and_generation_is_right(setup, decoded):
    """A batch of 4 (left-padded) and batches of 1 are two computations of the same numbers:
    scores within float32 rounding, greedy choices the naive decoding's but for near-ties."""
    lm = setup["ctp"]
    gen = {"until": ["\n\n", "."], "max_gen_toks": 6, "do_sample": False}
    contexts = [c for c, _ in PAIRS]  # 4 to 21 tokens: the batch is left-padded
    model, tok = load_any(setup["model"]), load_tokenizer(setup["model"])
    prompt = load_prompt_embeddings(setup["prompt"])
    ties = greedy_ties("batching")
    lls = []
    for batch_size in (4, 1):
        lm.batch_size_per_gpu = batch_size
        lls.append(lm.loglikelihood(requests("loglikelihood", PAIRS)))
        assert_same_greedy_flags(lls[-1], model, prompt, PAIRS, tok, ties)
        got = lm.generate_until(requests("generate_until", [(c, dict(gen)) for c in contexts]))
        assert got == [naive_greedy(model, prompt, tok, c, 6, gen["until"], decoded, ties) for c in contexts]
    lm.batch_size_per_gpu = 4
    assert max(abs(a[0] - b[0]) for a, b in zip(*lls)) < 1e-4


@pytest.fixture(scope="module")
def family_prompt(tmp_path_factory, tokenizer):
    """A prompt folder of 6 random virtual tokens for the hidden size (64) of every tiny family."""
    from ctp.artifacts import write_prompt_folder
    from ctp.models import tokenizer_fingerprint

    folder = tmp_path_factory.mktemp("family-prompt") / "prompt"
    prompt = torch.randn(6, 64, generator=torch.Generator().manual_seed(5)) * 0.5
    meta = {"num_virtual_tokens": 6, "hidden_size": 64, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "base_fingerprint": None, "prompt_config": {}, "best_val_ppl": 1.0}
    folder.mkdir()
    write_prompt_folder(folder, prompt, "tiny", 2, 4, meta)
    return str(folder)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "opt", "gpt_neox", "phi"])
def test_every_family_scores_and_generates_like_the_prepended_prompt(arch, tiny_dir, family_prompt, monkeypatch,
                                                                     decoded):
    import ctp.evaluation.lm_eval_plugin as plugin

    built = []
    real = plugin.context_of
    monkeypatch.setattr(plugin, "context_of", lambda *a: built.append(1) or real(*a))
    model_dir = str(tiny_dir(arch))
    lm = CTPLM(pretrained=model_dir, prompt=family_prompt, device="cpu", batch_size=4)
    model, tok = load_any(model_dir), load_tokenizer(model_dir)
    prompt = load_prompt_embeddings(family_prompt)
    naive = [naive_logprob(model, prompt, tok.encode(c + x), len(tok.encode(c))) for c, x in PAIRS]
    gen = {"until": ["\n\n"], "max_gen_toks": 5, "do_sample": False}
    contexts = [c for c, _ in PAIRS]
    for batch_size in (4, 1):
        lm.batch_size_per_gpu = batch_size
        ours = lm.loglikelihood(requests("loglikelihood", PAIRS))
        assert max(abs(a[0] - b) for a, b in zip(ours, naive)) < 1e-4
        got = lm.generate_until(requests("generate_until", [(c, dict(gen)) for c in contexts]))
        ties = greedy_ties(f"{arch} batch {batch_size}")
        assert got == [naive_greedy(model, prompt, tok, c, 5, gen["until"], decoded, ties) for c in contexts]
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    naive = [naive_logprob(model, prompt, [lm.prefix_token_id, *tok.encode(t)], 1) for t in TEXTS]
    assert max(abs(a - b) for a, b in zip(rolling, naive)) < 1e-4
    assert len(built) == 1  # one cache for every request, batch and kind
    ids = torch.tensor([tok.encode(TEXTS[0])])
    assert lm._model_call(ids).shape[:2] == ids.shape  # logits of the real tokens only


def test_sampling_and_unsupported_generation_arguments(setup):
    lm = setup["ctp"]
    sample = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": True, "temperature": 1.0, "top_p": 0.9}
    reqs = requests("generate_until", [(c, dict(sample)) for c, _ in PAIRS])
    torch.manual_seed(0)
    first = lm.generate_until(reqs)
    torch.manual_seed(0)
    assert lm.generate_until(requests("generate_until", [(c, dict(sample)) for c, _ in PAIRS])) == first
    others = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        others.append(lm.generate_until(requests("generate_until", [(c, dict(sample)) for c, _ in PAIRS])))
    greedy = lm.generate_until(requests("generate_until", [(c, {"until": ["\n\n"], "max_gen_toks": 6})
                                                           for c, _ in PAIRS]))
    assert any(o != first for o in others) and any(o != greedy for o in [first, *others])
    with pytest.raises(CTPError, match="num_beams"):
        lm.generate_until(requests("generate_until", [(PAIRS[0][0], {"until": ["."], "max_gen_toks": 4, "num_beams": 2})]))


def test_cli_writes_results_equal_to_simple_evaluate(setup, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = f"pretrained={setup['model']},prompt={setup['prompt']}"
    # this process's thread count: the CLI then does the very computation simple_evaluate does
    # here (accuracy and exact match are choices; equal only as the same computation)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    proc = subprocess.run(
        [sys.executable, "-m", "ctp.evaluation.lm_eval_plugin", "--model", "ctp", "--model_args", args,
         "--tasks", "ctp_tiny_mc,ctp_tiny_gen,ctp_tiny_ppl", "--include_path", str(TASKS),
         "--output_path", str(tmp_path / "out"), "--batch_size", "4"],  # no --device: CPU fallback
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA GPU: --model ctp runs on the CPU" in proc.stderr
    (path,) = (tmp_path / "out").rglob("results_*.json")
    written = json.loads(path.read_text())
    assert written["config"]["ctp"]["num_virtual_tokens"] == 4
    assert written["n-samples"]["ctp_tiny_mc"]["effective"] == 6
    register()  # what `import ctp` does: simple_evaluate(model="ctp") by name
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root
    here = lm_eval.simple_evaluate(
        model="ctp", model_args=args, tasks=["ctp_tiny_mc", "ctp_tiny_gen", "ctp_tiny_ppl"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        device="cpu", batch_size=4)
    for task, metric in [("ctp_tiny_mc", "acc,none"), ("ctp_tiny_gen", "exact_match,none"),
                         ("ctp_tiny_ppl", "word_perplexity,none")]:
        assert here["results"][task][metric] == pytest.approx(written["results"][task][metric], rel=1e-6)


@pytest.mark.parametrize("quant, label", [("none", "magnitude-50%"), ("nf4", "magnitude-50%+nf4")])
def test_compression_on_the_fly_equals_a_compressed_folder(setup, tmp_path, quant, label):
    folder = compress(setup["model"], CompressConfig(prune="magnitude", quant=quant), tmp_path / "mag",
                      progress=False).out
    # through lm-eval's own argument parsing (which turns "none" into None)
    fly = CTPLM.create_from_arg_string(
        f"pretrained={setup['model']},prompt={setup['prompt']},prune=magnitude,sparsity=0.5,quant={quant}",
        {"device": "cpu", "batch_size": 4})
    saved = CTPLM(pretrained=str(folder), prompt=setup["prompt"], device="cpu", batch_size=4)
    assert fly.ctp_info["compression"] == saved.ctp_info["compression"] == label
    assert fly.ctp_info["warnings"] == [] and fly.ctp_info["compressed_in_memory"]
    a, b = (m.loglikelihood(requests("loglikelihood", PAIRS)) for m in (fly, saved))
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-5
    dense = setup["ctp"].loglikelihood(requests("loglikelihood", PAIRS))
    assert max(abs(x[0] - y[0]) for x, y in zip(a, dense)) > 1e-3


@pytest.mark.parametrize("extra, message", [
    ("prune=magnitude,sparsity=2", "sparsity must be in [0, 1), got 2"),
    ("prune=pretty", "unknown prune 'pretty'"),
    ("prune=magnitude,pattern=4:2", "N:M pattern needs 0 < N < M"),
    ("sparsty=0.5", "unknown model_args sparsty"),
    ("peft=somewhere", "give prompt=FOLDER"),
    ("prompt={prompt},max_length=254", "max_length 254 plus 4 virtual tokens exceeds the model's context of 256"),
])
def test_bad_model_args_are_one_clear_ctp_error(setup, extra, message):
    with pytest.raises(CTPError) as err:
        CTPLM.create_from_arg_string(f"pretrained={setup['model']},{extra.format(**setup)}", {"device": "cpu"})
    assert message in str(err.value)


def test_in_memory_compression_runs_on_the_device_asked_for(setup, monkeypatch):
    """device=cuda:1 compresses on cuda:1 (not cuda:0). No GPU here: CUDA is faked up to the
    moment compression starts, where the config it was handed is inspected."""
    import ctp.evaluation.lm_eval_plugin as plugin

    class Started(Exception):
        pass

    seen = {}

    def fake_compress(model, config, out=None, **kwargs):
        seen["device"] = config.device
        raise Started

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(plugin, "compress", fake_compress)
    with pytest.raises(Started):
        CTPLM(pretrained=setup["model"], prune="magnitude", quant="nf4", device="cuda:1")
    assert seen["device"] == "cuda:1"
