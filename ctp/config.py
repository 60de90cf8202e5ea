"""Typed configuration: one dataclass per command, shared by the CLI, recipes and the API.

Every field has a default and a ``help`` string; checks that span fields live in
``__post_init__`` and raise :class:`~ctp.errors.CTPError`. Configs convert to plain dicts
(written next to every artifact) and back, with unknown keys and wrong types refused.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import CTPError

PRUNE_METHODS = ("wanda", "sparsegpt", "magnitude", "none")
ROUNDINGS = ("auto", "rtn", "obs")
QUANT_METHODS = ("nf4", "fp4", "int8", "none")
MAGNITUDE_SCOPES = ("matrix", "row")
DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
SPLITS = ("train", "validation", "test")
INITS = ("vocab", "sample-vocab", "random", "window")  # and text:...
BOS_RULES = ("auto", "always", "never")
PROMPT_TYPES = ("input", "kv")
OBJECTIVES = ("nll", "kd", "nll+kd")
INIT_MODELS = ("dense", "target")
SCHEDULES = ("linear", "cosine", "constant")
LR_SCALES = ("absolute", "part-rms")
PRECISIONS = ("auto", "fp32", "bf16")
DEMO_RECIPES = {"embedded": "demo", "smollm2-135m": "demo-smollm2"}  # `ctp demo --model` -> recipe

T = TypeVar("T")


def _help(text: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Field metadata: the help text and, when the value is one of a fixed set, the choices
    (checked by :func:`check_choices`; the CLI offers them)."""
    return {"help": text, "choices": choices} if choices else {"help": text}


def check_device(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else is a CTPError."""
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device):
        raise CTPError(f"unknown device {device!r}; choose from auto, cpu, cuda or cuda:N")


def check_choices(config: Any) -> None:
    """Every field whose metadata lists choices holds one of them."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise CTPError(f"unknown {f.name} {value!r}; choose from {', '.join(choices)}")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M; anything else is an error."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        raise CTPError(f"pattern must be 'unstructured' or N:M such as 2:4, got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise CTPError(f"N:M pattern needs 0 < N < M, got {pattern}")
    return n, m


@dataclass
class CompressConfig:
    """How to compress a model: prune (optionally), then quantize (optionally).

    The defaults -- SparseGPT 50% and NF4 with OBS rounding -- are the best measured on the
    embedded model and SmolLM2-135M (see the README's compression tables)."""

    prune: str = field(default="sparsegpt", metadata=_help(
        "pruning method: sparsegpt (second-order: masks from w^2/[H^-1]_jj, the surviving weights "
        "updated to compensate; the best measured), wanda (|W| x input norm, per output row; "
        "faster), magnitude, or none", PRUNE_METHODS))
    sparsity: float | None = field(
        default=None,
        metadata=_help("fraction of each decoder Linear's weights set to zero, in [0, 1); "
                       "default 0.5, or N/M for an N:M pattern"),
    )
    pattern: str = field(
        default="unstructured",
        metadata=_help("unstructured (per output row for wanda) or N:M: N zeros in every block "
                       "of M consecutive input weights, e.g. 2:4"),
    )
    magnitude_scope: str = field(
        default="matrix",
        metadata=_help("magnitude pruning threshold: one per matrix (Wanda's baseline) or per row",
                       MAGNITUDE_SCOPES),
    )
    quant: str = field(default="nf4", metadata=_help("quantization after pruning: nf4, fp4, int8 or none",
                                                     QUANT_METHODS))
    double_quant: bool = field(default=False, metadata=_help("also quantize the 4-bit scales"))
    rounding: str = field(default="auto", metadata=_help(
        "how weights reach the 4-bit / 8-bit grid: obs (each rounding error -- and after wanda or "
        "magnitude, each pruned weight -- compensated by the weights not yet rounded, through the "
        "inverse Hessian of the calibration inputs, as GPTQ; needs calibration text; the best "
        "measured), rtn (bitsandbytes' round to nearest; no calibration), or auto: obs when the "
        "pruning reads calibration text anyway (wanda, sparsegpt), else rtn", ROUNDINGS))
    dampening: float = field(default=0.01, metadata=_help(
        "sparsegpt / obs: added to the Hessian's diagonal, as a fraction of its mean"))
    blocksize: int = field(default=128, metadata=_help(
        "sparsegpt / obs: columns per block of the sweep (masks are chosen per block)"))
    compute_dtype: str = field(
        default="auto",
        metadata=_help("dtype 4-bit layers compute in: auto (bfloat16 on GPU, float32 on CPU), "
                       "float32, float16, bfloat16; the machine that loads the checkpoint may "
                       "choose again", DTYPE_NAMES),
    )
    calib: str = field(default="c4", metadata=_help("calibration text: c4, wikitext2, ptb, embedded or a file"))
    nsamples: int = field(default=128, metadata=_help("number of calibration windows"))
    seqlen: int | None = field(
        default=None, metadata=_help("calibration window length; default: the model's context, "
                                     "at most 2048"),
    )
    seed: int = field(default=0, metadata=_help("seed for calibration sampling"))
    device: str = field(
        default="auto",
        metadata=_help("where decoder layers are calibrated and pruned, one at a time: auto, cpu, "
                       "cuda or cuda:N"),
    )
    dtype: str = field(
        default="auto",
        metadata=_help("dtype for pruning: auto (float32 on CPU, the checkpoint's on GPU), "
                       "float32, float16, bfloat16", DTYPE_NAMES),
    )
    calib_batch_size: int = field(default=8, metadata=_help("calibration windows per layer forward"))
    bos: str = field(default="auto", metadata=_help(
        "BOS before every window: auto (for the families trained to depend on it, the Gemmas, as "
        "lm-eval does; elsewhere none, the published GPTQ/Wanda protocol), always, or never; BOS is "
        "context, never scored", BOS_RULES))
    trust_remote_code: bool = field(default=False, metadata=_help("allow the model repo's own code"))
    revision: str | None = field(default=None, metadata=_help("hub revision (branch, tag or commit)"))

    def __post_init__(self) -> None:
        check_choices(self)
        check_device(self.device)
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise CTPError(
                    f"pattern {self.pattern} implies sparsity {implied:g}; got sparsity {self.sparsity:g}"
                )
            self.sparsity = implied
        elif self.sparsity is None:
            self.sparsity = 0.5
        if not 0.0 <= self.sparsity < 1.0:
            raise CTPError(f"sparsity must be in [0, 1), got {self.sparsity:g}")
        if self.nsamples <= 0:
            raise CTPError(f"nsamples must be positive, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            raise CTPError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.calib_batch_size <= 0:
            raise CTPError(f"calib_batch_size must be positive, got {self.calib_batch_size}")
        if not self.dampening > 0:
            raise CTPError(f"dampening must be positive, got {self.dampening:g}")
        if self.blocksize <= 0:
            raise CTPError(f"blocksize must be positive, got {self.blocksize}")
        if self.rounding == "obs" and self.quant == "none":
            raise CTPError("rounding obs rounds onto a quantization grid: give --quant nf4, fp4 or int8")
        if self.rounding == "auto":
            calibrated = self.prune in ("wanda", "sparsegpt") and self.sparsity > 0
            self.rounding = "obs" if calibrated and self.quant != "none" else "rtn"
        if self.prune == "sparsegpt" and nm is not None and self.blocksize % nm[1]:
            raise CTPError(f"sparsegpt with pattern {self.pattern} needs a blocksize divisible by "
                           f"{nm[1]}, got {self.blocksize}")
        if self.prune == "none":
            self.sparsity = 0.0
            self.pattern = "unstructured"

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, else None."""
        return parse_pattern(self.pattern)

    def label(self) -> str:
        """A short human name, e.g. ``wanda-50%+nf4`` or ``wanda-2:4+nf4``."""
        parts = []
        if self.prune != "none":
            amount = self.pattern if self.nm else f"{self.sparsity * 100:g}%"
            parts.append(f"{self.prune}-{amount}")
        if self.quant != "none":
            parts.append(self.quant + ("-dq" if self.double_quant else "")
                         + ("-obs" if self.rounding == "obs" else ""))
        return "+".join(parts) or "dense"


@dataclass
class EvalConfig:
    """How to measure perplexity."""

    ppl: list[str] = field(
        default_factory=lambda: ["wikitext2"],
        metadata=_help("test sets: wikitext2, ptb, c4, embedded or .txt/.jsonl files"),
    )
    seqlen: int | None = field(
        default=None, metadata=_help("window length; default: the model's context (at most 4096) "
                                     "less the prompt's virtual tokens"),
    )
    split: str = field(default="test", metadata=_help("which split of named corpora to score", SPLITS))
    batch_size: int = field(default=1, metadata=_help("windows per forward pass"))
    max_windows: int | None = field(default=None, metadata=_help("score at most this many windows"))
    bos: str = field(default="auto", metadata=_help(
        "BOS before every window: auto (for the families trained to depend on it, the Gemmas, as "
        "lm-eval does; elsewhere none, the published GPTQ/Wanda protocol), always, or never; BOS is "
        "context, never scored", BOS_RULES))
    device: str = field(default="auto", metadata=_help("auto (the GPU when there is one), cpu, cuda "
                                                       "or cuda:N"))
    trust_remote_code: bool = field(default=False, metadata=_help("allow the model repo's own code"))

    def __post_init__(self) -> None:
        check_choices(self)
        check_device(self.device)
        if isinstance(self.ppl, str):
            self.ppl = [s for s in self.ppl.split(",") if s]
        if not self.ppl:
            raise CTPError("give at least one perplexity test set")
        if self.seqlen is not None and self.seqlen < 2:
            raise CTPError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.batch_size <= 0:
            raise CTPError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_windows is not None and self.max_windows <= 0:
            raise CTPError(f"max_windows must be positive, got {self.max_windows}")



@dataclass
class PromptConfig:
    """How to learn a soft prompt on a (compressed) model. The schedule's defaults follow the
    paper's code; the prompt's kind, objective and initialisation default to what measured best
    (a key/value prompt distilled from the dense base, started from a training window: README,
    "What a prompt wins back"); ``prompt_type="input", objective="nll", init="vocab"`` is the
    paper's own setting."""

    num_virtual_tokens: int = field(default=100, metadata=_help("length of the soft prompt"))
    prompt_type: str = field(default="kv", metadata=_help(
        "kv: n learned keys and values in every layer (PEFT prefix tuning, P-tuning v2; repairs "
        "most per parameter, README); input: n embeddings before the text, read by the first "
        "layer (PEFT prompt tuning, the paper)",
        PROMPT_TYPES))
    objective: str = field(default="kd", metadata=_help(
        "what training minimises: kd (the KL divergence from the teacher's next-token "
        "distribution on the same windows: rewards undoing compression, not adapting to the "
        "text; needs a compressed target or --teacher), nll (next-token loss on the training "
        "text, the paper; what a dense target takes), or nll+kd (mixed by --kd-weight)",
        OBJECTIVES))
    kd_weight: float = field(default=0.5, metadata=_help(
        "nll+kd: the loss is (1 - w) x nll + w x kd"))
    teacher: str | None = field(default=None, metadata=_help(
        "kd: the teacher model (default: the dense base named in the target's ctp_compression.json)"))
    teacher_cache: str | None = field(default=None, metadata=_help(
        "kd: a folder keeping the teacher's final hidden states of every training window it "
        "reads (in the teacher's dtype; float32: seqlen x hidden x 4 bytes a window); a later run "
        "on the same windows with the same teacher reads them and runs only the teacher's output "
        "head (a study's cells, a sweep). Results equal to within float32 rounding"))
    init: str = field(
        default="window",
        metadata=_help("initialisation: vocab (the first n embedding rows, as the paper), "
                       "sample-vocab (n random rows), random, window (the first n tokens of a "
                       "seeded training window) or text:SOME TEXT; a kv prompt starts as the keys "
                       "and values those embeddings produce in --init-model"),
    )
    init_model: str = field(default="dense", metadata=_help(
        "kv prompts: whose keys and values over the init tokens start the prompt: dense (the dense "
        "base, IntactKV-style; the model itself when it is dense) or target (the model tuned on: "
        "the kv prompt then starts exactly as the input prompt of the same init would)", INIT_MODELS))
    bos: str = field(default="auto", metadata=_help(
        "BOS before every window: auto (for the families trained to depend on it, the Gemmas, as "
        "lm-eval does; elsewhere none, the published GPTQ/Wanda protocol), always, or never; the "
        "prompt sits after it (BOS, prompt, text)", BOS_RULES))
    data: str = field(default="c4", metadata=_help("training text: c4, wikitext2, ptb, embedded or a file"))
    val_data: str | None = field(
        default=None,
        metadata=_help("validation text for checkpoint selection; default: the validation split "
                       "of --data (a file needs its own)"),
    )
    max_train_documents: int | None = field(
        default=None, metadata=_help("use only the first N training documents (c4 default: 5000, "
                                     "as the paper)"),
    )
    steps: int | None = field(default=None, metadata=_help(
        "optimizer steps (default 30000, or from --epochs); 0 saves the initialisation itself, "
        "validated (e.g. a training-free IntactKV-style kv prompt)"))
    epochs: float | None = field(default=None, metadata=_help("passes over the training chunks "
                                                             "instead of --steps"))
    lr: float = field(default=1e-3, metadata=_help("AdamW learning rate"))
    lr_scale: str = field(default="absolute", metadata=_help(
        "absolute: every value of the prompt moves at --lr; part-rms: each part of the prompt (an "
        "input prompt: all of it; a key/value prompt: the keys, or the values, of one layer) moves "
        "at --lr times its own RMS at the start (relative steps: a key/value prompt's parts differ "
        "up to 10x in scale)", LR_SCALES))
    weight_decay: float = field(default=1e-5, metadata=_help("AdamW weight decay"))
    warmup_steps: int | None = field(default=None, metadata=_help("linear warmup steps (default "
                                                                 "min(500, steps/10))"))
    schedule: str = field(default="linear", metadata=_help("learning-rate decay after warmup: "
                                                          "linear, cosine or constant", SCHEDULES))
    grad_clip: float = field(default=1.0, metadata=_help("clip the prompt gradient norm (0: off)"))
    seqlen: int | None = field(default=None, metadata=_help("training/validation window length "
                                                           "(default 1024, capped by the model's "
                                                           "context less the prompt)"))
    batch_size: int = field(default=2, metadata=_help("windows per process per micro-batch"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    eval_every: int = field(default=100, metadata=_help("validate (and maybe keep) every N steps"))
    eval_windows: int | None = field(default=128, metadata=_help("validation windows scored "
                                                                "(None: all)"))
    save_every: int = field(default=500, metadata=_help("write a resumable checkpoint every N steps"))
    seed: int = field(default=0, metadata=_help("seed for initialisation and data order"))
    precision: str = field(default="auto", metadata=_help("training arithmetic: auto (bf16 autocast "
                                                         "on GPU, fp32 on CPU), fp32 or bf16 (the "
                                                         "prompt itself stays fp32)", PRECISIONS))
    gradient_checkpointing: bool | None = field(
        default=None, metadata=_help("recompute each decoder layer in the backward pass instead of "
                                     "storing its activations (None: on for a GPU, off for a CPU)"))
    dropout: bool = field(default=False, metadata=_help("keep the frozen model's own dropout active "
                                                       "while training (off: the model is used "
                                                       "exactly as at inference)"))
    device: str = field(default="auto", metadata=_help("auto (the GPU when there is one), cpu, cuda "
                                                       "or cuda:N"))

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise CTPError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init not in INITS and not self.init.startswith("text:"):
            raise CTPError(f"init must be vocab, sample-vocab, random, window or text:..., got {self.init!r}")
        if self.init.startswith("text:") and not self.init[5:].strip():
            raise CTPError("init text:... needs some text after the colon")
        if self.steps is not None and self.steps < 0:
            raise CTPError(f"steps must not be negative, got {self.steps}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise CTPError(f"kd_weight must be in [0, 1], got {self.kd_weight:g}")
        if self.epochs is not None and self.epochs <= 0:
            raise CTPError(f"epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.epochs is not None:
            raise CTPError("give steps or epochs, not both")
        if self.lr <= 0:
            raise CTPError(f"lr must be positive, got {self.lr:g}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise CTPError("weight_decay and grad_clip must not be negative")
        check_choices(self)
        check_device(self.device)
        for name in ("batch_size", "grad_accum", "eval_every", "save_every"):
            if getattr(self, name) <= 0:
                raise CTPError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seqlen is not None and self.seqlen < 2:
            raise CTPError(f"seqlen must be at least 2, got {self.seqlen}")
        for name in ("eval_windows", "max_train_documents", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "warmup_steps" else 1):
                raise CTPError(f"{name} must be positive, got {value}")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """A config as a plain, JSON-ready dict."""
    return dataclasses.asdict(config)


def _check_type(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_check_type(v, inner) for v in value)
    if annotation is Any:
        return True
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a dict, refusing unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise CTPError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise CTPError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
        if cls is EvalConfig and key == "ppl" and isinstance(value, str):
            continue
        if not _check_type(value, hints[key]):
            raise CTPError(f"{where}: {key!r} must be {_type_name(hints[key])}, got {value!r}")
    try:
        return cls(**data)
    except CTPError as exc:
        if where == "arguments":  # CLI flags: the message names the flag's value already
            raise
        raise CTPError(f"{where}: {exc}") from None


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
