import pytest

from ctp.config import CompressConfig, EvalConfig, from_dict, parse_pattern, to_dict
from ctp.errors import CTPError


def test_round_trip():
    c = CompressConfig(prune="magnitude", pattern="4:8", quant="fp4", nsamples=4)
    assert from_dict(CompressConfig, to_dict(c)) == c
    assert c.sparsity == 0.5 and c.label() == "magnitude-4:8+fp4"


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity=1.0), "in \\[0, 1\\)"),
    (dict(sparsity=-0.1), "in \\[0, 1\\)"),
    (dict(pattern="4:2"), "0 < N < M"),
    (dict(pattern="2-4"), "unstructured' or N:M"),
    (dict(pattern="2:4", sparsity=0.3), "implies sparsity 0.5"),
    (dict(prune="pretty"), "unknown prune"),
    (dict(quant="int3"), "unknown quant"),
    (dict(nsamples=0), "nsamples must be positive"),
])
def test_bad_values(kwargs, message):
    with pytest.raises(CTPError, match=message):
        CompressConfig(**kwargs)


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(CTPError, match="unknown key 'sparsty'"):
        from_dict(CompressConfig, {"sparsty": 0.5}, where="r.yaml")
    with pytest.raises(CTPError, match="'nsamples' must be int"):
        from_dict(CompressConfig, {"nsamples": "many"})
    with pytest.raises(CTPError, match="'double_quant' must be bool"):
        from_dict(CompressConfig, {"double_quant": 1})


def test_pattern_parsing_and_eval_list():
    assert parse_pattern("unstructured") is None and parse_pattern("1:3") == (1, 3)
    assert EvalConfig(ppl="wikitext2,embedded").ppl == ["wikitext2", "embedded"]
    assert CompressConfig(prune="none").sparsity == 0.0


def test_the_public_api_names_stay_what_they_are():
    """A function of the API never shares its name with a subpackage: importing the subpackage
    would replace the function on the package (ctp.compress(...) called twice used to fail)."""
    import subprocess
    import sys

    code = ("import ctp, inspect\n"
            "import ctp.compression.pipeline, ctp.evaluation.api, ctp.generation, ctp.prompt.tune\n"
            "for name in ctp.__all__:\n"
            "    first, second = getattr(ctp, name), getattr(ctp, name)\n"
            "    assert first is second and not inspect.ismodule(first), name\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
