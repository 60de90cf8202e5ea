"""End-to-end: the demo recipe runs offline on the embedded model and its numbers are sane."""

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    proc = run_cli("demo", "--quick", "--workdir", str(tmp_path / "demo"), "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert [m["label"] for m in result["models"]] == ["nf4-obs", "sparsegpt-50%+nf4-obs"]
    assert [p["label"] for p in result["prompts"]] == ["kv10-kd@sparsegpt-50%+nf4-obs"]  # the defaults
    dense = result["dense"]["ppl"]
    assert 5 < dense < 80
    assert all(m["ppl"] > dense for m in result["models"])  # compression costs something
    assert all("ppl" in row[0] for row in result["cells"])
    results = tmp_path / "demo" / "results"
    assert (results / "transfer.png").stat().st_size > 1000 and (results / "transfer.md").exists()
    again = run_cli("demo", "--quick", "--workdir", str(tmp_path / "demo"), "--json", "--no-progress")
    assert json.loads(again.stdout)["cells"] == result["cells"]  # every step reused
    assert again.stderr.count("done already, skipping") == 4  # 2 compressions, 1 prompt, the evaluation
