import json

from pathlib import Path

import pytest
import torch

from conftest import calib_ids, tiny_model
from ctp.artifacts import COMPRESSION_FILE
from ctp.compression.pipeline import compress
from ctp.config import CompressConfig
from ctp.errors import CTPError
from ctp.models import weights_fingerprint


def test_report_and_metadata_file(tmp_path):
    model = tiny_model("llama")
    fingerprint = weights_fingerprint(model)
    params = sum(p.numel() for p in model.parameters())
    ids = calib_ids(4, 32)
    result = compress(model, CompressConfig(prune="wanda", pattern="2:4"), tmp_path / "out",
                      calibration=ids, progress=False)
    saved = json.loads((tmp_path / "out" / COMPRESSION_FILE).read_text())
    assert saved == json.loads(json.dumps(result.report))
    assert saved["base_fingerprint"] == fingerprint
    assert saved["compression"]["pattern"] == "2:4" and saved["compression"]["sparsity"] == 0.5
    assert saved["calibration"] == {"source": "tensor", "nsamples": 4, "seqlen": 32, "seed": None}
    assert saved["sparsity_after_pruning"]["overall"] == 0.5
    assert 0.5 <= saved["sparsity"]["overall"] < 0.51  # nf4 rounds a few tiny weights to zero
    from ctp.compression.prune import decoder_linears
    from ctp.compression.quantize import dense_weight

    counts = {}  # zeros / weights per layer type, read back from the modules themselves
    for name, module in decoder_linears(result.model).items():
        w = dense_weight(module)
        z, n = counts.get(name.rsplit(".", 1)[-1], (0, 0))
        counts[name.rsplit(".", 1)[-1]] = (z + int((w == 0).sum()), n + w.numel())
    assert saved["sparsity"]["by_type"] == pytest.approx({k: z / n for k, (z, n) in counts.items()})
    assert set(counts) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    stored = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert saved["parameters"] == params and saved["bits_per_weight"] == pytest.approx(8 * stored / params)
    assert saved["label"] == "wanda-2:4+nf4-obs"  # obs rounding: the default when calibrated


def test_fingerprint_is_dtype_independent():
    model = tiny_model("llama").half()
    a = weights_fingerprint(model)
    assert weights_fingerprint(model.float()) == a
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    assert weights_fingerprint(model) != a


def test_existing_output_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CTPError, match="already exists"):
        compress(tiny_model(), CompressConfig(prune="magnitude", quant="none"), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    compress(tiny_model(), CompressConfig(prune="magnitude", quant="none"), out, overwrite=True,
             progress=False)
    assert not (out / "old.txt").exists() and (out / COMPRESSION_FILE).exists()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    """A failure after the checkpoint is already written into the staging folder (while writing
    the report) removes the staging folder and leaves no output."""
    import ctp.compression.pipeline as pipeline

    staged = []

    def boom(path, obj):
        folder = Path(path).parent
        staged.extend(p.name for p in folder.iterdir())
        assert folder.parent == tmp_path and folder.name.startswith(".out.tmp-")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "write_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        compress(tiny_model(), CompressConfig(prune="magnitude", quant="nf4"), tmp_path / "out",
                 progress=False)
    assert "model.safetensors" in staged and "config.json" in staged  # it failed late
    assert list(tmp_path.iterdir()) == []


def test_in_memory_compression_needs_no_folder():
    result = compress(tiny_model(), CompressConfig(prune="magnitude", quant="none"), progress=False)
    assert result.out is None and result.report["sparsity"]["overall"] == 0.5
