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


class FakeHub:
    """Stand-in for ``datasets.load_dataset``: small in-memory datasets named like the real
    ones (documents numbered so every subset is visible), streaming or not; records calls."""

    def __init__(self, sizes):
        self.sizes, self.calls = sizes, []

    def __call__(self, path, name=None, data_files=None, split=None, streaming=False):
        import datasets

        self.calls.append({"path": path, "name": name, "data_files": data_files, "split": split,
                           "streaming": streaming})
        field = "sentence" if path == "ptb_text_only" else "text"
        rows = [{field: f"{path}-{split}-{i}"} for i in range(self.sizes[(path, split)])]
        if streaming:
            return iter(rows)  # an IterableDataset yields rows one at a time
        return datasets.Dataset.from_list(rows)


@pytest.fixture
def hub(monkeypatch):
    import datasets

    fake = FakeHub({("wikitext", "test"): 5, ("ptb_text_only", "test"): 4, ("allenai/c4", "validation"): 3500,
                    ("allenai/c4", "train"): 7000})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def test_test_sets_are_joined_as_the_published_code_joins_them(hub):
    assert load_text("wikitext2", "test") == "\n\n".join(f"wikitext-test-{i}" for i in range(5))
    assert load_text("ptb", "test") == " ".join(f"ptb_text_only-test-{i}" for i in range(4))
    c4 = load_text("c4", "test")
    assert c4 == " ".join(f"allenai/c4-validation-{i}" for i in range(1100))  # SparseGPT's 1,100
    assert hub.calls[-1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_c4_validation_never_meets_test_and_train_is_sliced_while_streaming(hub):
    validation = load_documents("c4", "validation")
    assert validation[0] == "allenai/c4-validation-1100" and len(validation) == 2000
    train = load_documents("c4", "train", max_documents=5000)
    assert train == [f"allenai/c4-train-{i}" for i in range(5000)]
    assert hub.calls[-1]["streaming"] and hub.calls[-1]["data_files"] == {
        "train": "en/c4-train.00000-of-01024.json.gz"}


def test_prompt_training_reads_the_papers_5000_c4_documents(hub):
    from ctp.config import PromptConfig
    from ctp.prompt.tune import training_text

    train, val = training_text(PromptConfig(data="c4"))
    assert train.count("allenai/c4-train-") == 5000 and "allenai/c4-train-5000" not in train
    assert train.startswith("allenai/c4-train-0 allenai/c4-train-1 ")
    assert val.split(" ")[0] == "allenai/c4-validation-1100"
    assert any(c["streaming"] for c in hub.calls if c["split"] == "train")


def test_c4_test_perplexity_uses_its_first_256_windows(hub, tokenizer, monkeypatch):
    import ctp.evaluation.api as api

    seen = {}

    def fake(model, ids, seqlen, prompt, batch_size, max_windows, progress, desc):
        seen.update(seqlen=seqlen, max_windows=max_windows, ids=ids)

    monkeypatch.setattr(api, "perplexity_of_ids", fake)
    model = type("M", (), {"config": type("C", (), {"max_position_embeddings": 2048})()})()
    api.perplexity(model, tokenizer, "c4", "test")
    assert seen["max_windows"] == 256 and seen["seqlen"] == 2048
    from ctp.data import tokenize

    assert torch.equal(seen["ids"], tokenize(tokenizer, load_text("c4", "test")))
