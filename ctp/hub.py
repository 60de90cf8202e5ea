"""``ctp push``: publish a compressed model, a prompt, or a stitched pair to the Hugging Face Hub.

The folder is staged in a temporary folder, plus a ``README.md`` model card written from its
ctp metadata (a README.md the folder already has is kept instead), and uploaded with one
``upload_folder`` call. Nothing uploaded names a folder of the uploader's machine: in the staged
copy only, every JSON file's path fields (``base_model_name_or_path``, ``model``, ``prompt``,
``data``, ...) are written as the card writes them -- a Hub id as it is, a local path as its last
component (:func:`publish_paths`); every other file, and the user's folder, stay byte for byte
as they are. The token is left to huggingface_hub (argument, ``HF_TOKEN``, saved login) and never
appears in the card, the staged files, or an error message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .artifacts import (COMPRESSION_FILE, PAIR_PROMPT_DIR, PROMPT_FILE, STITCH_FILE, make_temp_dir,
                        read_compression_meta, read_prompt_meta, read_stitch_meta)
from .data import HUB_SOURCES, SOURCE_NAMES
from .errors import CTPError
from .zoo import NAMED_MODELS

log = logging.getLogger(__name__)

COMPRESSED, PROMPT, PAIR = "compressed", "prompt", "stitched pair"
_PROTOCOL = "GPTQ/Wanda protocol, virtual positions never scored"


@dataclass
class PushResult:
    """What :func:`push` did. ``card`` is the generated card even when ``readme_kept``."""

    repo_id: str
    kind: str
    url: str | None  # the repo (or branch) page; None for a dry run
    commit_url: str | None
    staged: Path | None  # dry run only: the folder that would have been uploaded, left in place
    files: list[str]  # paths uploaded (or that would be), README.md included
    card: str
    readme_kept: bool  # the folder had its own README.md, uploaded instead of the card

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``staged`` as a string)."""
        return {**asdict(self), "staged": str(self.staged) if self.staged else None}


def folder_kind(folder: str | os.PathLike) -> str:
    """``"compressed"``, ``"prompt"`` or ``"stitched pair"``; anything else is a CTPError."""
    path = Path(folder)
    if not path.is_dir():
        raise CTPError(f"{folder} is not a folder")
    if (path / STITCH_FILE).is_file() and (path / PAIR_PROMPT_DIR).is_dir():  # before: it may hold both
        return PAIR
    if (path / PROMPT_FILE).is_file() and (path / "adapter_config.json").is_file():
        return PROMPT
    if (path / COMPRESSION_FILE).is_file():
        return COMPRESSED
    raise CTPError(f"{folder} is not a ctp folder: expected {COMPRESSION_FILE} (compressed model), "
                   f"{PROMPT_FILE} + adapter_config.json (prompt) or {STITCH_FILE} + prompt/ "
                   "(stitched pair)")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _is_local(name: str, recorded: bool | None = None) -> bool:
    """Whether ``name`` is a path on the machine that made the artifact (``recorded`` when the
    artifact says so; otherwise judged from its shape and from this machine's files)."""
    if recorded is not None:
        return recorded
    return (os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)
            or not _HUB_ID.fullmatch(name))


def _public(name: Any, recorded_local: bool | None = None) -> Any:
    """A name fit for an upload (card or file): Hub ids, corpus and named models as they are; a
    local path only as its last component (an upload never says where files lie on a machine)."""
    if not isinstance(name, str) or name in SOURCE_NAMES or name in NAMED_MODELS:
        return name
    return Path(name).name if _is_local(name, recorded_local) else name


# Fields of ctp's and PEFT's JSON files (and transformers' configs) that hold a model folder or
# a text file: ``base_model_name_or_path`` (adapter_config.json), ``model`` / ``base_model`` /
# ``prompt`` (ctp_prompt.json, ctp_stitch.json, ctp_compression.json), ``calib`` / ``data`` /
# ``val_data`` (the configs) and ``source`` (calibration / training / validation records).
PATH_KEYS = frozenset({"base_model_name_or_path", "_name_or_path", "name_or_path", "model",
                       "base_model", "prompt", "calib", "data", "val_data", "source", "teacher",
                       "teacher_cache"})


def publish_paths(obj: Any, key: str | None = None, recorded_local: bool | None = None) -> Any:
    """Parsed JSON ``obj`` with every string under a :data:`PATH_KEYS` key (at any depth, in
    lists too) made :func:`_public`; a sibling ``<key>_local`` boolean (``base_model_local``)
    says whether that name is a local path. Numbers and all other strings are returned as
    they are; ``obj`` is not modified."""
    if isinstance(obj, dict):
        return {k: publish_paths(v, k, obj.get(f"{k}_local") if isinstance(obj.get(f"{k}_local"), bool)
                                 else None) for k, v in obj.items()}
    if isinstance(obj, list):
        return [publish_paths(v, key, recorded_local) for v in obj]
    return _public(obj, recorded_local) if key in PATH_KEYS and isinstance(obj, str) else obj


def _hub_id(name: Any, recorded_local: bool | None = None) -> str | None:
    """``name`` when it can be a Hub model id (not ``embedded``, not a local path)."""
    if not isinstance(name, str) or name in NAMED_MODELS or _is_local(name, recorded_local):
        return None
    return name


def _dataset(source: Any) -> str | None:
    hub = HUB_SOURCES.get(source) if isinstance(source, str) else None
    return hub.path if hub else None


def _pruned(cfg: dict[str, Any]) -> bool:
    return cfg.get("prune", "none") != "none" and (cfg.get("sparsity") or 0) > 0


def _compression_tags(cfg: dict[str, Any] | None) -> list[str]:
    cfg, tags = cfg or {}, []
    if _pruned(cfg):
        tags += ["pruned", cfg["prune"]]
        tags += [cfg["pattern"]] if cfg.get("pattern", "unstructured") != "unstructured" else []
    if cfg.get("quant", "none") != "none":
        tags += ["8-bit" if cfg["quant"] == "int8" else "4-bit", cfg["quant"], "bitsandbytes"]
    return tags


def _describe(cfg: dict[str, Any] | None) -> str:
    if not cfg:
        return "the dense (uncompressed) model"
    parts = []
    if _pruned(cfg):
        pattern = cfg.get("pattern", "unstructured")
        shape = pattern if pattern == "unstructured" else f"{pattern} semi-structured"
        parts.append(f"{cfg['prune']} pruning to {cfg['sparsity']:.0%} sparsity ({shape})")
    if cfg.get("quant", "none") != "none":
        names = {"nf4": "4-bit NF4", "fp4": "4-bit FP4", "int8": "8-bit LLM.int8()"}
        parts.append(f"{names.get(cfg['quant'], cfg['quant'])} quantization with bitsandbytes"
                     + (" (double quantization)" if cfg.get("double_quant") else ""))
    return ", then ".join(parts) or "no compression"


def _num(x: Any, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "not recorded"


def _yaml(obj: Any) -> str:
    return "```yaml\n" + yaml.safe_dump(obj, sort_keys=False).strip() + "\n```"


def _table(title: str, rows: list[tuple[str, str]]) -> list[str]:
    return [f"## {title}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _compression_section(report: dict[str, Any]) -> list[str]:
    """The card's compression section, from a :func:`publish_paths` report."""
    sp, calib = report.get("sparsity", {}), report.get("calibration") or {}
    base = report.get("base_model")
    rows = [("base model", f"`{base}` (weights fingerprint {report.get('base_fingerprint')})"),
            ("method", _describe(report.get("compression")))]
    if calib:
        origin = ("given as token ids" if calib.get("source") == "tensor"
                  else f"from `{calib.get('source')}`, seed {calib.get('seed')}")
        rows.append(("calibration", f"{calib.get('nsamples')} windows of {calib.get('seqlen')} tokens {origin}"))
    if "overall" in sp:
        mask = report.get("sparsity_after_pruning", {}).get("overall", 0)
        rows.append(("achieved sparsity",
                     f"{sp['overall']:.2%} of decoder linear weights as stored (pruning mask: {mask:.2%})"))
    if "bits_per_weight" in report:
        rows.append(("bits per weight", (f"{report['bits_per_weight']:.2f} (every stored byte, scales "
                                         f"included, over all {report.get('parameters', 0):,} parameters)")))
    if "disk_bytes" in report:
        rows.append(("size on disk", (f"{report['disk_bytes'] / 2**20:.1f} MiB "
                                      f"(dense: {report.get('dense_bytes', 0) / 2**20:.1f} MiB)")))
    if report.get("unquantized_modules"):
        rows.append(("not quantized", ", ".join(report["unquantized_modules"])))
    lines = _table("Compression", rows)
    if sp.get("by_type"):
        lines += ["| layer type | sparsity |", "|---|---:|",
                  *(f"| {k} | {v:.2%} |" for k, v in sp["by_type"].items()), ""]
    lines += [f"Configuration (`{COMPRESSION_FILE}`, ctp {report.get('ctp_version')}):", "",
              _yaml(report.get("compression")), ""]
    return lines


def _prompt_section(meta: dict[str, Any]) -> list[str]:
    """The card's soft-prompt section, from a :func:`publish_paths` ``ctp_prompt.json``."""
    train, val = meta.get("training_data") or {}, meta.get("validation_data") or {}
    cfg = meta.get("prompt_config") or {}
    kind = _prompt_kind(meta)
    shape = (f"hidden size {meta.get('hidden_size')}" if kind == "input" else
             f"{meta.get('kv_layers')} layers x {meta.get('kv_heads')} key/value heads x head size "
             f"{meta.get('head_dim')}")
    objective = meta.get("objective", "nll")
    teacher = f" (teacher `{meta.get('teacher')}`)" if meta.get("teacher") else ""
    bos = meta.get("bos_token_id")
    rows = [("kind", _KIND_TEXT[kind]),
            ("virtual tokens", f"{meta.get('num_virtual_tokens')} ({shape})"),
            ("objective", _OBJECTIVES.get(objective, objective) + teacher),
            ("BOS", "none" if bos is None else f"token {bos} before every window, then the prompt"),
            ("trained on", f"`{meta.get('compression_label') or 'dense'}` copy of `{meta.get('base_model')}`"),
            ("training", (f"{meta.get('steps')} steps of {meta.get('global_batch')} windows of "
                          f"{meta.get('seqlen')} tokens from `{train.get('source')}` (train split)"))]
    lines = _table("Soft prompt", rows)
    if meta.get("best_val_ppl") is not None:
        step = f", step {meta['best_step']}" if meta.get("best_step") is not None else ""
        lines += ["| validation perplexity | |", "|---|---:|",
                  f"| with the prompt (best{step}) | {_num(meta['best_val_ppl'])} |",
                  f"| without a prompt | {_num(meta.get('val_ppl_without_prompt'))} |", "",
                  (f"Measured on the **{val.get('split', 'validation')}** split of `{val.get('source')}` "
                   f"({val.get('windows')} windows of {meta.get('seqlen')} tokens; {_PROTOCOL}). The prompt "
                   "was selected on this split, so the number is optimistic; the test split was never used "
                   "in training (`ctp eval` measures it)."), ""]
    lines += [f"Training configuration (`{PROMPT_FILE}`):", "",
              _yaml(cfg), ""]
    return lines


def _usage(kind: str, repo: str, meta: dict[str, Any] | None) -> list[str]:
    local = repo.split("/")[-1]
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")')
    if kind == COMPRESSED:
        code, shell = load, f"ctp eval {local} --ppl wikitext2"
    elif kind == PAIR:
        code = (f"from peft import PeftModel\n{load}\n"
                f'model = PeftModel.from_pretrained(model, "{repo}", subfolder="prompt")')
        shell = f"ctp eval {local} --prompt {local}/prompt --ppl wikitext2"
    else:
        code = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                "# the compressed model the prompt was trained on (see above)\n"
                "model = AutoModelForCausalLM.from_pretrained(COMPRESSED_MODEL)\n"
                f'model = PeftModel.from_pretrained(model, "{repo}")')
        shell = f"ctp eval COMPRESSED_MODEL_DIR --prompt {local} --ppl wikitext2"
    lines = ["## Usage", "", "```python", code, "```", ""]
    if meta and meta.get("prompt_type", "input") == "input":
        lines += [(f"The outputs start with {meta.get('num_virtual_tokens')} positions for the virtual "
                   "tokens; drop them before reading logits."), ""]
    elif meta:
        lines += ["A key/value prompt adds keys and values to every layer, no positions: the outputs "
                  "are the text's own.", ""]
    return lines + ["Perplexity with ctp (`hf download` fetches the folder):", "", "```bash",
                    f"hf download {repo} --local-dir {local}", shell, "```", ""]


_KIND_TEXT = {"input": "an input prompt: a PEFT prompt-tuning adapter, n embeddings before the text",
              "kv": "a key/value prompt: a PEFT prefix-tuning adapter, n keys and values in every layer"}
_KIND_TAGS = {"input": "prompt-tuning", "kv": "prefix-tuning"}
_OBJECTIVES = {"nll": "next-token loss on the training text (the paper's)",
               "kd": "distillation: the KL divergence from the dense model's next-token distribution",
               "nll+kd": "next-token loss and distillation, mixed"}


def _prompt_kind(meta: dict[str, Any] | None) -> str:
    return (meta or {}).get("prompt_type", "input")


def _named_source(base: Any) -> Any:
    named = NAMED_MODELS.get(base) if isinstance(base, str) else None
    return named.source if named is not None else None


def _license(base: Any) -> str | None:
    """The Hub licence id of a named model the weights derive from (None: unknown, say nothing)."""
    source = _named_source(base)
    return source.hub_license if source is not None else None


def _terms(base: Any) -> str:
    """What the card must say about a named base's weights and licence."""
    source = _named_source(base)
    if source is None:
        return ""
    return (f"The weights derive from {source.upstream} under {source.license}; its \"dense\" weights "
            f"are {source.weights}.")


def build_card(folder: str | os.PathLike, repo_id: str | None = None) -> str:
    """The model card (YAML metadata + Markdown) for a ctp folder, from its JSON files only."""
    from huggingface_hub import ModelCard, ModelCardData

    path, kind = Path(folder), folder_kind(folder)
    report = read_compression_meta(path) if kind != PROMPT else None
    meta = read_prompt_meta(path if kind == PROMPT else path / PAIR_PROMPT_DIR) or None
    stitched = read_stitch_meta(path) if kind == PAIR else {}
    report_, meta_ = report or {}, meta or {}
    # a pair is described by its own model; the prompt may have been trained on another copy
    compression = meta_.get("compression") if kind == PROMPT else report_.get("compression")
    base_local = report_.get("base_model_local") if report else None
    raw_base = report_.get("base_model") or meta_.get("base_model")
    base = _public(raw_base, base_local)
    sources = [(report_.get("calibration") or {}).get("source"),
               (meta_.get("training_data") or {}).get("source"),
               (meta_.get("validation_data") or {}).get("source")]
    # "embedded" or a local folder has nothing on the Hub to point to; a pruned, unquantized copy
    # fits none of the Hub's relations (adapter, merge, quantized, finetune): the Hub infers one
    quantized = (compression or {}).get("quant", "none") != "none"
    relation = "adapter" if kind == PROMPT else "quantized" if quantized else None
    data = ModelCardData(
        base_model=_hub_id(raw_base, base_local),
        base_model_relation=relation if _hub_id(raw_base, base_local) else None,
        library_name="peft" if kind == PROMPT else "transformers", pipeline_tag="text-generation",
        datasets=list(dict.fromkeys(d for d in map(_dataset, sources) if d)) or None,
        tags=["ctp", *_compression_tags(compression), *(["soft-prompt", _KIND_TAGS[_prompt_kind(meta)]]
                                                         if meta else [])],
        license=_license(base),
    )
    base_text = f"`{base}`" + (f" ({NAMED_MODELS[base].description})" if base in NAMED_MODELS else "")
    what = {COMPRESSED: f"A compressed copy of {base_text}: {_describe(compression)}. An ordinary "
                        "transformers checkpoint; loading it needs bitsandbytes when it is quantized.",
            PROMPT: f"A soft prompt ({_KIND_TEXT[_prompt_kind(meta)]}) that recovers quality lost by "
                    f"compressing {base_text}: {_describe(compression)}.",
            PAIR: f"A copy of {base_text}, {_describe(compression)}, with a soft prompt "
                  f"({_KIND_TEXT[_prompt_kind(meta)]}) in `prompt/` that recovers quality lost by "
                  "compression."}[kind]
    terms = _terms(base)
    if terms:
        what += " " + terms
    cite = (' Made with ctp (Compress, Then Prompt; Xu et al., "Soft Prompt Recovers Compressed LLMs, '
            'Transferably", ICML 2024).')
    body = [f"# {(repo_id or path.resolve().name).split('/')[-1]}", "", what + cite, ""]
    body += _compression_section(publish_paths(report)) if report else []
    body += _prompt_section(publish_paths(meta)) if meta else []
    if stitched.get("ppl"):
        without, with_ = stitched["ppl"].get("without_prompt", {}), stitched["ppl"].get("with_prompt", {})
        body += ["## Perplexity of this pair", "", "| test set | without the prompt | with the prompt |",
                 "|---|---:|---:|",
                 *(f"| {s} | {_num(without.get(s))} | {_num(v)} |" for s, v in with_.items()),
                 "", f"Measured by `ctp stitch --ppl` ({_PROTOCOL}).", ""]
    body += _usage(kind, repo_id or "USER/NAME", meta)
    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body)))


def _stage(folder: Path, card: str, link: bool) -> tuple[Path, bool]:
    """Copy ``folder`` (hard links where allowed) into a fresh temp folder, publish the paths
    its JSON files name (:func:`_publish_json_files`), and add the card."""
    staged = make_temp_dir(prefix="ctp-push-")

    def copy(src: str, dst: str) -> None:
        try:
            if not link:
                raise OSError
            os.link(src, dst)  # no second copy of a multi-GB checkpoint; bytes are the same file
        except OSError:
            shutil.copy2(src, dst)

    try:  # .git and .cache are refused by the Hub client; the user's README.md is never replaced
        shutil.copytree(folder, staged, dirs_exist_ok=True, copy_function=copy,
                        ignore=shutil.ignore_patterns(".git", ".cache"))
        _publish_json_files(staged)
        kept = (staged / "README.md").exists()
        if not kept:
            (staged / "README.md").write_text(card, encoding="utf-8")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged, kept


def _publish_json_files(staged: Path) -> list[str]:
    """Rewrite, in ``staged`` only, each JSON file whose path fields :func:`publish_paths`
    changes; return the rewritten files (relative paths).

    A rewritten file is a new file: the staged one may be a hard link to the user's, which must
    not change. Its indentation, key order and final newline are kept; a file that is not valid
    UTF-8 JSON, or names no local path, stays the very file it was.
    """
    rewritten = []
    for path in sorted(staged.rglob("*.json")):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            obj = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        public = publish_paths(obj)
        if public == obj:  # unchanged values are the very objects: NaN compares equal here
            continue
        indent = re.search(r"\n([ \t]+)\S", text)
        new = json.dumps(public, indent=indent[1] if indent else None, ensure_ascii=text.isascii())
        path.unlink()  # break a hard link before writing
        path.write_text(new + ("\n" if text.endswith("\n") else ""), encoding="utf-8")
        rewritten.append(path.relative_to(staged).as_posix())
    return rewritten


def _scrub(text: str, token: str | None) -> str:
    # not huggingface_hub.get_token(): it may refresh an OAuth token over the network
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret:
            text = text.replace(secret, "***")
    text = re.sub(r"\bhf_[A-Za-z0-9]{30,}", "hf_***", text)  # a saved token, whatever its source
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)


def _hub_error(exc: Exception, repo_id: str, endpoint: str, token: str | None) -> CTPError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return CTPError("offline mode is on (HF_HUB_OFFLINE=1): unset it to push to the Hub")
    if isinstance(exc, HfHubHTTPError):
        code = exc.response.status_code
        request = exc.response.request
        where = f"{request.method} {request.url.path}" if request is not None else endpoint
        detail = f" ({exc.server_message})" if exc.server_message else ""
        text = {401: f"{endpoint} refused the credentials (401 Unauthorized at {where}{detail}): not "
                     "logged in, or the token is invalid or expired; run `hf auth login` or set HF_TOKEN "
                     "to a token with write access",
                403: f"no permission to write to {repo_id} (403 Forbidden at {where}{detail}): the token "
                     "needs write access to that namespace",
                404: f"not found on {endpoint} (404 at {where}{detail}): check the repo id {repo_id} "
                     "and the revision"}.get(code, f"the Hub answered {code} at {where}{detail}")
        return CTPError(_scrub(text, token))
    if isinstance(exc, ValueError):  # e.g. README.md metadata the Hub rejects
        return CTPError(_scrub(f"the Hub refused the upload to {repo_id}: {exc}", token))
    return CTPError(_scrub(f"could not reach the Hub at {endpoint} ({type(exc).__name__}: {exc}); "
                           "check the network connection (and HF_ENDPOINT)", token))


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False, endpoint: str | None = None,
         token: str | None = None) -> PushResult:
    """Upload a compressed folder, a prompt folder or a stitched pair to ``repo_id`` with a model card.

    Args:
        folder: what ``ctp compress``, ``ctp tune-prompt`` or ``ctp stitch --out`` wrote.
        repo_id: ``USER/NAME`` (or ``ORG/NAME``); created (model repo) if missing.
        private: create the repo private (an existing repo keeps its visibility).
        revision: a branch to push to, created from the default branch if missing.
        dry_run: stage the folder and its card in a temporary ``ctp-push-*`` folder, left in place
            for inspection: exactly the files an upload sends (local paths in its JSON files
            already published); no network call, nothing uploaded.
        endpoint: the Hub's URL (default: ``HF_ENDPOINT``, else https://huggingface.co).
        token: a write token (default: ``HF_TOKEN`` or the saved ``hf auth login``).
    """
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    try:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1:
            raise ValueError("one namespace, one name")
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise CTPError(f"repo id must look like USER/NAME, got {repo_id!r} ({exc})") from None
    kind, card = folder_kind(folder), build_card(folder, repo_id)
    if not dry_run and constants.is_offline_mode():  # before staging gigabytes for nothing
        raise CTPError("offline mode is on (HF_HUB_OFFLINE=1): unset it to push to the Hub")
    staged, kept = _stage(Path(folder), card, link=not dry_run)  # a dry run's copy may be edited
    if kept:
        log.warning("%s has its own README.md: it is uploaded as is, not replaced by the generated card",
                    folder)
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    result = PushResult(repo_id=repo_id, kind=kind, url=None, commit_url=None, staged=staged,
                        files=files, card=card, readme_kept=kept)
    if dry_run:
        return result
    api = HfApi(endpoint=endpoint, token=token, library_name="ctp", library_version=__version__)
    branch = revision if revision and revision != "main" else None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=staged, revision=revision, repo_type="model",
                                 commit_message=commit_message or f"Upload {kind} with ctp")
    except (HfHubHTTPError, httpx2.TransportError, ConnectionError, ValueError) as exc:
        raise _hub_error(exc, repo_id, api.endpoint, token) from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    result.url = f"{api.endpoint}/{repo_id}" + (f"/tree/{branch}" if branch else "")
    result.commit_url, result.staged = str(info.commit_url), None
    return result
