"""Recipes: validation with clear errors, and `ctp run` resuming without redoing finished steps."""

import json
from pathlib import Path

import pytest
import yaml

import ctp.recipe as recipe_mod
from ctp.cli import main
from ctp.errors import CTPError
from ctp.recipe import load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data,message", [
    ({"model": "x", "compres": {}}, "unknown key 'compres'"),
    ({"model": "x", "compress": {"a": {"sparsty": 0.5}}}, "compress.a: unknown key 'sparsty'"),
    ({"model": "x", "compress": {"a": {"nsamples": "many"}}}, "compress.a: 'nsamples' must be int"),
    ({"model": "x", "compress": {"a": {"sparsity": 2.0}}}, "sparsity must be in"),
    ({"model": "x", "prompts": {"p": {"target": "nope", "config": {}}}}, "'target' must name a compress target"),
    ({"model": "x", "compress": {"a": {}}, "prompts": {"p": {"target": "a", "config": {"lr": "fast"}}}},
     "prompts.p.config: 'lr' must be float"),
    ({"model": "x", "eval": {"ppl": 3}}, "eval: 'ppl' must be"),
    ({"compress": {}}, "'model' must name"),
    ({"model": "x", "eval": {"ppl": ["embedded", "wikitext2"]}}, "one test set"),
])
def test_validation_errors_name_the_key_and_the_file(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(CTPError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_cli_errors_are_one_line(tmp_path, capfd):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    for args, message in [(["run", str(tmp_path / "bad.yaml")], "not valid YAML"),
                          (["run", str(tmp_path / "missing.yaml")], "not found"),
                          (["run", "demo", "--set", "eval.seqlen"], "KEY=VALUE"),
                          (["run", "demo", "--set", "nosuch.key=1"], "no section 'nosuch'")]:
        assert main(args) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_shipped_recipes_are_valid():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.compress and recipe.prompts, path
    assert (REPO / "recipes" / "demo.yaml").read_text() == (REPO / "ctp" / "recipes" / "demo.yaml").read_text()


def test_set_overrides_are_typed():
    recipe = load_recipe("demo", ["prompts.p10-sparsegpt-50pct+nf4.config.steps=7", "eval.seqlen=128"])
    assert recipe.prompts["p10-sparsegpt-50pct+nf4"].config.steps == 7 and recipe.eval.seqlen == 128


def test_run_resumes_after_an_interrupted_step(tmp_path, tiny_dir, monkeypatch):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    from ctp.data import embedded_corpus_dir

    corpus = embedded_corpus_dir()
    train.write_text((corpus / "train.txt").read_text()[:60_000])
    val.write_text((corpus / "validation.txt").read_text()[:20_000])
    data = {
        "model": str(tiny_dir("llama")), "workdir": str(tmp_path / "work"),
        "compress": {"mag": {"prune": "magnitude", "quant": "none"},
                     "mag24": {"prune": "magnitude", "pattern": "2:4", "quant": "nf4"}},
        "prompts": {"p": {"target": "mag", "config": {
            "num_virtual_tokens": 4, "data": str(train), "val_data": str(val), "steps": 6, "lr": 0.01,
            "seqlen": 32, "batch_size": 2, "eval_every": 3, "eval_windows": 4, "save_every": 3,
            "device": "cpu"}}},
        "eval": {"ppl": [str(val)], "seqlen": 32, "max_windows": 5, "device": "cpu"},
    }
    recipe = load_recipe(write(tmp_path, data))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_mod, "tune_prompt", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, progress=False)
    assert (tmp_path / "work" / "models" / "mag24" / "ctp_compression.json").exists()
    assert not (tmp_path / "work" / "prompts" / "p").exists()

    monkeypatch.undo()
    calls = []
    real_compress = recipe_mod.compress
    monkeypatch.setattr(recipe_mod, "compress", lambda *a, **k: calls.append(a) or real_compress(*a, **k))
    result = run_recipe(recipe, progress=False)
    assert calls == []  # finished compressions are not redone
    assert (tmp_path / "work" / "prompts" / "p" / "adapter_model.safetensors").exists()
    assert [m["label"] for m in result["models"]] == ["magnitude-50%", "magnitude-2:4+nf4"]
    assert len(result["cells"]) == 2 and "ppl" in result["cells"][1][0]
    stamp = (tmp_path / "work" / "results" / "transfer.json").stat().st_mtime
    again = run_recipe(recipe, progress=False)  # everything done: nothing recomputed
    assert (tmp_path / "work" / "results" / "transfer.json").stat().st_mtime == stamp
    assert again["cells"] == json.loads((tmp_path / "work" / "results" / "transfer.json").read_text())["cells"]


def test_a_prompt_is_retuned_when_its_target_changes(tmp_path, tiny_dir, monkeypatch):
    from ctp.data import embedded_corpus_dir

    corpus = embedded_corpus_dir()
    (tmp_path / "train.txt").write_text((corpus / "train.txt").read_text()[:30_000])
    (tmp_path / "val.txt").write_text((corpus / "validation.txt").read_text()[:10_000])
    data = {
        "model": str(tiny_dir("llama")), "workdir": str(tmp_path / "work"),
        "compress": {"m": {"prune": "magnitude", "sparsity": 0.5, "quant": "none"}},
        "prompts": {"p": {"target": "m", "config": {
            "num_virtual_tokens": 2, "data": str(tmp_path / "train.txt"), "val_data": str(tmp_path / "val.txt"),
            "steps": 2, "seqlen": 32, "batch_size": 2, "eval_every": 2, "eval_windows": 2, "device": "cpu"}}},
        "eval": {"ppl": [str(tmp_path / "val.txt")], "seqlen": 32, "max_windows": 2, "device": "cpu"},
    }
    path = write(tmp_path, data)
    run_recipe(load_recipe(path), progress=False)
    calls = []
    real = recipe_mod.tune_prompt
    monkeypatch.setattr(recipe_mod, "tune_prompt", lambda *a, **k: calls.append(a) or real(*a, **k))
    run_recipe(load_recipe(path), progress=False)
    assert calls == []  # nothing changed
    # a prompt made before a setting existed (its default then) and a teacher cache moved: still done
    meta_path = tmp_path / "work" / "prompts" / "p" / "ctp_prompt.json"
    meta = json.loads(meta_path.read_text())
    del meta["prompt_config"]["lr_scale"], meta["prompt_config"]["teacher_cache"]
    meta_path.write_text(json.dumps(meta))
    run_recipe(load_recipe(path, ["prompts.p.config.teacher_cache=cache"]), progress=False)
    assert calls == []
    result = run_recipe(load_recipe(path, ["compress.m.sparsity=0.75"]), progress=False)
    assert len(calls) == 1  # the target changed: its prompt is tuned again
    assert result["prompts"][0]["label"] == "kv2-kd@magnitude-75%"  # the defaults: distilled, keys and values
