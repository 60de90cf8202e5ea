"""Build eval/data/heldout_ctp_prose.txt: a held-out text no pretrained model has seen.

    python eval/make_heldout_text.py          # rewrites the file (commit it with the results)

SmolLM2 (released November 2024) and every other pretrained model predate this project, so its
own prose cannot be in their training data: this file joins ctp's README and the docstrings of
its modules (at least 80 characters each, deduplicated), as written in 2026. It is frozen in the
repository so the perplexities measured on it can be recomputed; rebuilding it after the code
changes gives a different text.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "eval" / "data" / "heldout_ctp_prose.txt"


def docstrings(path: Path, seen: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 80 and doc not in seen:
                seen.add(doc)
                found.append(doc)
    return found


def main() -> None:
    seen: set[str] = set()
    parts = [(REPO / "README.md").read_text(encoding="utf-8")]
    for path in sorted((REPO / "ctp").rglob("*.py")):
        parts += docstrings(path, seen)
    text = "\n\n".join(parts)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"{OUT.relative_to(REPO)}: {len(text):,} characters, sha256 "
          f"{hashlib.sha256(text.encode()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
