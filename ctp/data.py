"""Text corpora, tokenization and calibration sampling.

Sources, by name:

- ``embedded``: English technical prose built at first use from the docstrings of installed
  packages (no download), split by document into train / validation / test and cached.
- ``wikitext2``, ``ptb``, ``c4``: the usual Hugging Face datasets (need a network).
- a path to a local ``.txt`` file (one document) or ``.jsonl`` file (one document per line, in
  its ``"text"`` field).

Every source yields documents; :func:`load_text` joins them as the GPTQ / SparseGPT / Wanda
perplexity code does, so numbers compare with published tables: WikiText-2 with ``"\\n\\n"``, C4
and PTB with a single space. The embedded corpus and local files join with ``"\\n\\n"``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import SPLITS
from .errors import CTPError

log = logging.getLogger(__name__)

DOCUMENT_JOINER = "\n\n"  # the embedded corpus and local files

# ---------------------------------------------------------------------------------------------
# The embedded corpus
# ---------------------------------------------------------------------------------------------

EMBEDDED_PACKAGES = ("torch", "transformers", "numpy", "datasets", "peft", "accelerate")
EMBEDDED_VERSION = "v2"
# sha256 of the three split files as built with the pinned versions in pyproject.toml.
EMBEDDED_SHA256 = {
    "train": "9d1e3f26ee22b8616ea4f5c678d3f6275babab065237e5ee62c26643c5459a47",
    "validation": "9b67aac40f962deb7240fe7c33aa1e0c2ef3c92bf51fd6c7da355b534148a6c0",
    "test": "5eaa603db09348131c5151306cfdd4e0e7cea966d58eddeb043ee36fff17d1e1",
}
_MIN_DOCSTRING_CHARS = 80
_SPLIT_SALT = b"ctp-embedded-corpus-v1"


def cache_dir() -> Path:
    """Where ctp caches generated data: ``$CTP_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctp``."""
    if os.environ.get("CTP_CACHE_DIR"):
        return Path(os.environ["CTP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ctp"


def _module_docstrings(path: Path, seen: set[bytes]) -> list[str]:
    """Docstrings of a source file's module, classes and functions not seen before."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < _MIN_DOCSTRING_CHARS:
                continue
            key = hashlib.sha1(doc.encode()).digest()
            if key not in seen:
                seen.add(key)
                found.append(doc)
    return found


def _split_of(key: str) -> str:
    """Assign a document to a split by a salted hash of its name: 90% / 5% / 5%."""
    bucket = int.from_bytes(hashlib.sha256(_SPLIT_SALT + key.encode()).digest()[:4], "big") % 100
    return "train" if bucket < 90 else ("validation" if bucket < 95 else "test")


def _build_embedded(target: Path) -> None:
    """Collect, deduplicate and split the docstrings; write the split files into ``target``."""
    seen: set[bytes] = set()
    docs: dict[str, list[str]] = {s: [] for s in SPLITS}
    versions = {}
    for package in EMBEDDED_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise CTPError(f"the embedded corpus needs the installed package {package!r}")
        versions[package] = importlib.metadata.version(package)
        root = Path(spec.origin).parent
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = Path(dirpath) / name
                parts = _module_docstrings(path, seen)
                if parts:
                    key = f"{package}/{path.relative_to(root).as_posix()}"
                    docs[_split_of(key)].append("\n\n".join(parts))
    manifest: dict[str, Any] = {"version": EMBEDDED_VERSION, "packages": versions, "splits": {}}
    for split in SPLITS:
        text = "\n\n".join(docs[split])
        (target / f"{split}.txt").write_text(text, encoding="utf-8")  # the joined text, hashed
        with open(target / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for doc in docs[split]:
                fh.write(json.dumps({"text": doc}) + "\n")
        manifest["splits"][split] = {
            "documents": len(docs[split]),
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def embedded_corpus_dir() -> Path:
    """Return the cached embedded-corpus folder, building it (about a minute) if needed.

    Logs a warning when the text differs from the one the pinned dependency versions give:
    numbers measured on it will then not match the README's.
    """
    final = cache_dir() / f"embedded-corpus-{EMBEDDED_VERSION}"
    if not (final / "manifest.json").exists():
        log.info("building the embedded corpus from installed docstrings (once, ~1 min)")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".corpus-", dir=final.parent))
        try:
            _build_embedded(tmp)
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _check_embedded_hash(final)
    return final


def _check_embedded_hash(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    for split, expected in EMBEDDED_SHA256.items():
        got = manifest["splits"][split]["sha256"]
        if expected and got != expected:
            log.warning(
                "the embedded corpus differs from the reference build (%s split sha256 %s..., "
                "expected %s...); installed package versions %s differ from the pinned ones, so "
                "perplexities will not match the README",
                split, got[:12], expected[:12], manifest["packages"],
            )
            return


def embedded_corpus_info() -> dict[str, Any]:
    """The manifest of the embedded corpus: package versions, and per split docs/chars/sha256."""
    return json.loads((embedded_corpus_dir() / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# Hub and local sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    """How to read one Hugging Face dataset: ``datasets.load_dataset`` arguments per split."""

    path: str
    name: str | None
    field: str
    splits: dict[str, tuple[str, dict[str, str] | None, slice | None]]
    joiner: str  # how the published perplexity code joins this corpus's documents


_C4_TRAIN = {"train": "en/c4-train.00000-of-01024.json.gz"}
_C4_VALID = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
HUB_SOURCES: dict[str, HubSource] = {
    "wikitext2": HubSource(
        "wikitext", "wikitext-2-raw-v1", "text",
        {s: (s, None, None) for s in SPLITS}, "\n\n",
    ),
    "ptb": HubSource(
        "ptb_text_only", "penn_treebank", "sentence",
        {s: (s, None, None) for s in SPLITS}, " ",
    ),
    # Wanda's calibration shard for train; SparseGPT's first 1,100 validation documents for
    # test; the rest of that validation shard for checkpoint selection, so the two never meet.
    "c4": HubSource(
        "allenai/c4", None, "text",
        {
            "train": ("train", _C4_TRAIN, None),
            "test": ("validation", _C4_VALID, slice(0, 1100)),
            "validation": ("validation", _C4_VALID, slice(1100, 3100)),
        },
        " ",
    ),
}
SOURCE_NAMES = ("embedded", *HUB_SOURCES)


def _load_hub(source: HubSource, split: str, max_documents: int | None = None) -> list[str]:
    """The split's documents; with ``max_documents`` only the first ones are read (streamed:
    the 356K-document C4 shard is never materialised for the 5,000 a prompt trains on)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise CTPError(f"the `datasets` package is needed for hub corpora: {exc}") from None
    hf_split, data_files, rows = source.splits[split]
    if max_documents is not None:
        start = rows.start or 0 if rows is not None else 0
        stop = start + max_documents if rows is None else min(rows.stop, start + max_documents)
        rows = slice(start, stop)
    try:
        if max_documents is not None:
            stream = datasets.load_dataset(source.path, source.name, data_files=data_files,
                                           split=hf_split, streaming=True)
            return [row[source.field] for row in itertools.islice(stream, rows.start, rows.stop)]
        ds = datasets.load_dataset(source.path, source.name, data_files=data_files, split=hf_split)
        texts = ds[source.field]
    except Exception as exc:  # network down, offline mode, dataset moved
        raise CTPError(f"could not load dataset {source.path!r} ({split}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return list(texts[rows] if rows is not None else texts)


def _load_local(path: Path) -> list[str]:
    if path.is_dir():
        raise CTPError(f"{path} is a folder; give a .txt or .jsonl file")
    if path.suffix == ".jsonl":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise CTPError(f"{path} is not UTF-8 text") from None
        docs = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise CTPError(f"{path}:{number}: each line must be a JSON object with a "
                               '"text" string')
            docs.append(text)
        return docs
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise CTPError(f"{path} is not UTF-8 text") from None


def load_documents(source: str, split: str = "test", max_documents: int | None = None) -> list[str]:
    """Documents of ``source`` (a name in :data:`SOURCE_NAMES` or a file path) for ``split``;
    at most the first ``max_documents`` of them.

    A local file is the same text for every split.
    """
    if split not in SPLITS:
        raise CTPError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if source in HUB_SOURCES:
        return _load_hub(HUB_SOURCES[source], split, max_documents)
    if source == "embedded":
        docs = _load_local(embedded_corpus_dir() / f"{split}.jsonl")
        return docs[:max_documents]
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path)[:max_documents]
    raise CTPError(
        f"unknown text source {source!r}: not a file, and not one of {', '.join(SOURCE_NAMES)}"
    )


def joiner_of(source: str) -> str:
    """How ``source``'s documents are joined into one text (see the module docstring)."""
    return HUB_SOURCES[source].joiner if source in HUB_SOURCES else DOCUMENT_JOINER


def load_text(source: str, split: str = "test", max_documents: int | None = None) -> str:
    """The documents of ``source``/``split`` joined as the published perplexity code joins them."""
    return joiner_of(source).join(load_documents(source, split, max_documents))


def source_label(source: str) -> str:
    """A short stable name for a source: the name itself, or a file's base name."""
    return source if source in SOURCE_NAMES else Path(source).name


def tokenize(tokenizer: Any, text: str, bos: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` once with the tokenizer's defaults; return a 1-D LongTensor of ids.

    ``bos``: the BOS id the rule puts before every window (:func:`ctp.lm.bos_token`); a BOS the
    tokenizer itself puts at the start of the text is then dropped, so no window reads two.
    """
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    if bos is not None and ids[:1] == [bos]:
        ids = ids[1:]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` consecutive tokens at seeded random offsets.

    Args:
        ids: 1-D token ids of the corpus.
    Returns:
        LongTensor ``[nsamples, seqlen]``.
    """
    if nsamples <= 0:
        raise CTPError(f"nsamples must be positive, got {nsamples}")
    if seqlen <= 0:
        raise CTPError(f"seqlen must be positive, got {seqlen}")
    if ids.numel() < seqlen + 1:
        raise CTPError(
            f"the text has {ids.numel()} tokens, too short for one window of {seqlen} tokens"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_ids(
    tokenizer: Any, source: str, nsamples: int, seqlen: int, seed: int, bos: int | None = None
) -> torch.Tensor:
    """Calibration windows ``[nsamples, seqlen]`` from the train split of ``source``.

    Large corpora (c4's 350K-document shard, the embedded train split) are not tokenized whole:
    a seeded random subset of documents with about six characters per needed token is joined
    and tokenized, then the windows are drawn from it.
    """
    if nsamples <= 0:
        raise CTPError(f"nsamples must be positive, got {nsamples}")
    docs = load_documents(source, "train")
    budget = nsamples * seqlen * 6
    if sum(len(d) for d in docs) > 2 * budget:
        gen = torch.Generator().manual_seed(seed)
        chosen = []
        for i in torch.randperm(len(docs), generator=gen).tolist():
            chosen.append(docs[i])
            budget -= len(docs[i])
            if budget <= 0:
                break
        docs = chosen
    return sample_windows(tokenize(tokenizer, joiner_of(source).join(docs), bos), nsamples, seqlen, seed)
