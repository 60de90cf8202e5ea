"""Atomic output folders: build in a temporary sibling, rename into place when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CTPError


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output path unless ``overwrite``; return it as a Path."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise CTPError(f"output folder {path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise CTPError(f"output path {path} exists and is not a folder")
    return path


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename.

    On any exception the temporary folder is removed and ``out`` is left untouched.
    """
    final = check_output_dir(out, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order) with a trailing newline."""
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a missing or malformed file into a CTPError."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CTPError(f"{path} not found") from None
    except json.JSONDecodeError as exc:
        raise CTPError(f"{path} is not valid JSON: {exc}") from None
