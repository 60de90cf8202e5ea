"""End-to-end: the demo runs offline on the embedded model and its numbers are sane."""

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    proc = run_cli("demo", "--quick", "--workdir", str(tmp_path / "demo"), "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "nf4", "wanda-50%+nf4", "wanda-50%+nf4 + prompt"}
    prompted = rows["wanda-50%+nf4 + prompt"]
    assert prompted["prompt"].endswith("wanda-50pct+nf4") and "recovered" in prompted
    assert result["seqlen"] == 256
    dense = rows["dense"]["ppl"]["embedded"]
    assert 5 < dense < 60
    assert rows["wanda-50%+nf4"]["ppl"]["embedded"] > dense  # compression costs something
    assert (tmp_path / "demo" / "results.json").exists()
    again = run_cli("demo", "--quick", "--workdir", str(tmp_path / "demo"), "--json", "--no-progress")
    assert json.loads(again.stdout)["rows"] == result["rows"]  # reused, same numbers
