import json

import pytest
import torch

from ctp.data import (embedded_corpus_info, load_documents, load_text, sample_windows,
                      EMBEDDED_SHA256)
from ctp.errors import CTPError


def test_windows_are_seeded_and_in_range():
    ids = torch.arange(1000)
    a = sample_windows(ids, 8, 50, seed=1)
    assert a.shape == (8, 50) and torch.equal(a, sample_windows(ids, 8, 50, seed=1))
    assert not torch.equal(a, sample_windows(ids, 8, 50, seed=2))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # consecutive tokens


def test_text_too_short_for_one_window():
    with pytest.raises(CTPError, match="too short for one window of 50"):
        sample_windows(torch.arange(30), 4, 50, seed=0)
    with pytest.raises(CTPError, match="nsamples must be positive"):
        sample_windows(torch.arange(300), 0, 50, seed=0)


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("one document\n\nstill the same one")
    assert load_documents(str(tmp_path / "a.txt")) == ["one document\n\nstill the same one"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    assert load_text(str(tmp_path / "b.jsonl")) == "x\n\ny"
    (tmp_path / "c.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(CTPError, match="c.jsonl:1"):
        load_documents(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(CTPError, match="d.jsonl:2"):
        load_documents(str(tmp_path / "d.jsonl"))
    (tmp_path / "e.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(CTPError, match="not UTF-8"):
        load_documents(str(tmp_path / "e.jsonl"))
    with pytest.raises(CTPError, match="unknown text source"):
        load_documents(str(tmp_path / "missing.txt"))


def test_embedded_corpus_is_split_by_document_and_matches_reference_hash():
    info = embedded_corpus_info()
    splits = info["splits"]
    assert splits["train"]["chars"] > 10 * splits["test"]["chars"] > 0
    assert {s: v["sha256"] for s, v in splits.items()} == EMBEDDED_SHA256
    test_docs = set(load_documents("embedded", "test"))
    valid_docs = set(load_documents("embedded", "validation"))
    assert test_docs and valid_docs and not (test_docs & valid_docs)
