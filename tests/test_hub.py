"""``ctp push`` against a local fake Hub that speaks what huggingface_hub's client sends.

The server answers the requests ``HfApi.create_repo``, ``create_branch`` and ``upload_folder``
make (repo creation, README metadata validation, preupload, NDJSON commit), records every
request, and keeps the committed files, so the tests check exactly what would reach the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from conftest import calib_ids, run_cli, tiny_model
from ctp.compression.pipeline import compress
from ctp.config import CompressConfig, PromptConfig
from ctp.errors import CTPError
from ctp.hub import build_card, push
from ctp.prompt.stitch import save_stitched
from ctp.prompt.tune import tune_prompt

TOKEN = "hf_testtoken_DO_NOT_LEAK_123"
BASE = "ctp-test/tiny-llama"  # what a model loaded from the Hub carries as its name
_REPO_OP = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|branch)/(?P<rev>[^/]+)$")


class FakeHub:
    """State shared with the handler: requests seen, files committed, a forced failure."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, revision) -> path -> bytes
        self.commits: list[dict] = []
        self.fail: tuple[int, dict, dict] | None = None  # status, JSON body, headers
        self.fail_on = ""  # only paths containing this fail
        self.existing: set[str] = set()
        self.lock = threading.Lock()

    def answer(self, method: str, path: str, body: bytes, host: str) -> tuple[int, dict, dict]:
        if self.fail and self.fail_on in path:
            return self.fail
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            url = f"http://{host}/{payload['organization']}/{payload['name']}"
            if f"{payload['organization']}/{payload['name']}" in self.existing:
                # the client reads "url" from this 409 too (create_repo with exist_ok)
                return 409, {"error": "You already created this model repo", "url": url}, {}
            return 200, {"url": url}, {}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        match = _REPO_OP.match(path)
        if method == "POST" and match and match["op"] == "branch":
            return 200, {}, {}
        if method == "POST" and match and match["op"] == "preupload":
            # "regular" for every file: content travels base64 in the commit, no LFS/xet storage
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": None} for f in json.loads(body)["files"]]}, {}
        if method == "POST" and match and match["op"] == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            stored = self.files.setdefault((match["repo"], match["rev"]), {})
            for line in lines[1:]:
                assert line["key"] == "file" and line["value"]["encoding"] == "base64", line
                stored[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            self.commits.append(lines[0]["value"])
            oid = hashlib.sha1(body).hexdigest()
            return 200, {"commitUrl": f"http://{host}/{match['repo']}/commit/{oid}", "commitOid": oid}, {}
        return 404, {"error": f"fake hub: no route for {method} {path}"}, {}


class _Handler(BaseHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold a server thread forever

    def _serve(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        with hub.lock:
            hub.requests.append({"method": self.command, "path": url.path, "query": url.query,
                                 "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            status, payload, headers = hub.answer(self.command, url.path, body, self.headers["Host"])
        data = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    # an offline user's shell must not reach the CLI processes these tests start: huggingface_hub
    # refuses every request, even to this local server, under HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/ctp-test-token")  # no saved login
    # building the user agent fetches {ENDPOINT}/api/agent-harnesses unless telemetry is off
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    close_session()  # the shared client read proxy settings when it was made
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.hub = FakeHub()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    deadline = threading.Timer(120, server.shutdown)  # bounded even if a test hangs
    deadline.daemon = True
    deadline.start()
    server.hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    # what HF_ENDPOINT sets when huggingface_hub is imported (push(endpoint=None) reads it)
    monkeypatch.setattr(constants, "ENDPOINT", server.hub.endpoint)  # type: ignore[attr-defined]
    try:
        yield server.hub  # type: ignore[attr-defined]
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)
        close_session()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer):
    """A real compressed folder, a prompt tuned on it, and the two stitched together."""
    root = tmp_path_factory.mktemp("hub")
    model = tiny_model("llama")
    model.config._name_or_path = BASE
    comp = compress(model, CompressConfig(prune="wanda", quant="nf4"), root / "compressed",
                    tokenizer=tokenizer, calibration=calib_ids(4, 32), progress=False).out
    text = torch.randint(0, 60, (3000,), generator=torch.Generator().manual_seed(0))
    tune_prompt(str(comp), PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=4, lr=0.05, seqlen=32, batch_size=2,
                                        eval_every=2, eval_windows=4, data="embedded"),
                root / "prompt", train_ids=text, val_ids=text[:1000], progress=False)
    save_stitched(str(root / "prompt"), str(comp), root / "pair")
    # every folder of this machine that these artifacts can name lies under the base temp folder
    return {"compressed": comp, "prompt": root / "prompt", "pair": root / "pair", "root": root,
            "local": str(tmp_path_factory.getbasetemp())}


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _published(text: str, local: str) -> str:
    """``text`` (a JSON file) as an upload must carry it, computed here without ctp: each JSON
    string that is a path under ``local`` replaced by its last component, nothing else touched."""
    path = re.compile('"(' + re.escape(local) + r'(?:/[^"]*)?)"')
    return path.sub(lambda m: json.dumps(Path(m[1]).name), text)


def _assert_published(uploaded: dict[str, bytes], folder: Path, local: str) -> None:
    """What reached the Hub is ``folder`` with every local path in its JSON files cut to its
    folder's name and otherwise byte for byte (indentation, key order and numbers included),
    plus the card; nothing in it names a folder under ``local``."""
    mine = _tree(folder)
    assert sorted(set(uploaded) - {"README.md"}) == sorted(mine)
    for name, data in mine.items():
        want = _published(data.decode(), local).encode() if name.endswith(".json") else data
        assert uploaded[name] == want, name
    for name, data in uploaded.items():
        assert local.encode() not in data, name


def _card_data(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def _assert_no_token(hub: FakeHub, *texts: str) -> None:
    for r in hub.requests:
        assert TOKEN.encode() not in r["body"] and TOKEN not in r["path"] + r["query"]
    for files in hub.files.values():
        assert all(TOKEN.encode() not in data for data in files.values())
    assert all(TOKEN not in t for t in texts)


@pytest.mark.parametrize("xet", [True, False], ids=["pipelined-upload", "single-commit"])
def test_compressed_folder_arrives_byte_identical_with_its_card(hub, artifacts, monkeypatch, capfd, xet):
    from huggingface_hub import constants

    # hf_xet installed -> upload_folder streams batches; without it -> one create_commit
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    folder = artifacts["compressed"]
    result = push(folder, "alice/tiny-wanda", endpoint=hub.endpoint, token=TOKEN,
                  commit_message="first upload")
    uploaded = hub.files[("alice/tiny-wanda", "main")]
    _assert_published(uploaded, folder, artifacts["local"])  # its base is a Hub id: nothing to cut
    assert {k: v for k, v in uploaded.items() if k != "README.md"} == _tree(folder)
    assert sorted(uploaded) == result.files and "model.safetensors" in uploaded
    data = _card_data(uploaded["README.md"].decode())
    assert data["base_model"] == BASE and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"ctp", "pruned", "wanda", "4-bit", "nf4"} <= set(data["tags"])
    assert "soft-prompt" not in data["tags"] and "datasets" not in data  # calibration was a tensor
    assert uploaded["README.md"].decode() == result.card and not result.readme_kept
    report = json.loads((folder / "ctp_compression.json").read_text())
    assert f"{report['bits_per_weight']:.2f}" in result.card
    assert f"{report['sparsity']['overall']:.2%}" in result.card
    assert hub.commits == [{"summary": "first upload", "description": ""}]
    # the card's YAML is checked by the server first (create_commit checks it a second time)
    assert [r["path"] for r in hub.requests].count("/api/validate-yaml") == (1 if xet else 2)
    create = json.loads(next(r for r in hub.requests if r["path"] == "/api/repos/create")["body"])
    assert create == {"name": "tiny-wanda", "organization": "alice", "visibility": "public", "type": "model"}
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert hub.requests[0]["headers"]["user-agent"].startswith("ctp/")
    assert result.url == f"{hub.endpoint}/alice/tiny-wanda" and result.commit_url.startswith(result.url)
    assert result.staged is None and result.kind == "compressed"
    out = capfd.readouterr()
    _assert_no_token(hub, out.out, out.err, result.card)


def test_prompt_folder_to_a_private_repo_on_a_branch(hub, artifacts, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the usual place, read by huggingface_hub itself
    folder = artifacts["prompt"]
    before = _tree(folder)
    result = push(folder, "alice/tiny-prompt", private=True, revision="v1")  # endpoint: HF_ENDPOINT
    assert _tree(folder) == before  # staged through hard links: the rewritten files are new ones
    assert [(r["method"], r["path"]) for r in hub.requests if "validate" not in r["path"]] == [
        ("POST", "/api/repos/create"), ("POST", "/api/models/alice/tiny-prompt/branch/v1"),
        ("POST", "/api/models/alice/tiny-prompt/preupload/v1"),
        ("POST", "/api/models/alice/tiny-prompt/commit/v1")]
    assert json.loads(hub.requests[0]["body"])["visibility"] == "private"
    uploaded = hub.files[("alice/tiny-prompt", "v1")]
    _assert_published(uploaded, folder, artifacts["local"])
    adapter, sent = json.loads(uploaded["adapter_config.json"]), json.loads(uploaded["ctp_prompt.json"])
    assert adapter["base_model_name_or_path"] == sent["model"] == "compressed"  # the folder's name
    assert sent["base_model"] == BASE  # a Hub id stays
    data = _card_data(uploaded["README.md"].decode())
    assert data["library_name"] == "peft" and data["base_model_relation"] == "adapter"
    assert data["base_model"] == BASE and {"ctp", "soft-prompt", "wanda"} <= set(data["tags"])
    meta = json.loads((folder / "ctp_prompt.json").read_text())
    card = uploaded["README.md"].decode()
    assert f"{meta['best_val_ppl']:.4f}" in card and f"{meta['val_ppl_without_prompt']:.4f}" in card
    assert "**validation** split" in card and "virtual positions never scored" in card
    assert 'PeftModel.from_pretrained(model, "alice/tiny-prompt")' in card
    assert result.url == f"{hub.endpoint}/alice/tiny-prompt/tree/v1"
    assert hub.requests[0]["headers"]["authorization"] == f"Bearer {TOKEN}"
    _assert_no_token(hub, card)


def test_dry_run_sends_nothing_and_leaves_the_staged_folder(hub, artifacts):
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def no_network():
        raise AssertionError("a dry run opened an HTTP client")

    set_client_factory(no_network)  # any request, to any host, would need a client first
    try:
        result = push(artifacts["pair"], "alice/pair", dry_run=True, endpoint=hub.endpoint, token=TOKEN)
    finally:
        set_client_factory(default_client_factory)
    try:
        assert hub.requests == [] and result.url is None and result.kind == "stitched pair"
        staged = _tree(result.staged)  # exactly what an upload sends
        _assert_published(staged, artifacts["pair"], artifacts["local"])
        stitch = json.loads(staged["ctp_stitch.json"])
        assert (stitch["model"], stitch["prompt"]) == ("compressed", "prompt")
        assert json.loads(staged["prompt/adapter_config.json"])["base_model_name_or_path"] == "compressed"
        assert json.loads(staged["ctp_compression.json"])["base_model"] == BASE
        assert "prompt/adapter_model.safetensors" in staged and sorted(staged) == result.files
        from huggingface_hub import ModelCard

        data = ModelCard.load(result.staged / "README.md").data.to_dict()
        assert data["library_name"] == "transformers" and data["base_model"] == BASE
        assert {"soft-prompt", "4-bit"} <= set(data["tags"])
        # the card's usage snippet runs as written (the repo id pointed at the staged copy)
        code = re.search(r"```python\n(.*?)```", result.card, re.DOTALL)[1]
        scope: dict = {}
        exec(code.replace('"alice/pair"', repr(str(result.staged))), scope)  # noqa: S102 (our own card)
        assert type(scope["model"]).__name__ == "PeftModelForCausalLM"
        assert scope["model"].peft_config["default"].num_virtual_tokens == 4
        assert result.staged.name.startswith("ctp-push-")
        assert not any(TOKEN.encode() in v for v in staged.values())
    finally:
        shutil.rmtree(result.staged)


@pytest.mark.parametrize("kind", ["prompt", "compressed", "pair"])
def test_an_upload_names_no_local_folder_and_the_users_files_stay(hub, artifacts, tmp_path, kind):
    """A local base model, calibration and training files, the model a prompt was tuned on and
    the pair's sources reach the Hub as their folders' names (a Hub id as it is), in a dry run's
    staged copy and in the real upload alike; the folder on disk keeps its local paths."""
    folder = tmp_path / "mine" / kind
    shutil.copytree(artifacts["prompt" if kind == "prompt" else kind], folder)
    meta_file = {"prompt": "ctp_prompt.json", "compressed": "ctp_compression.json",
                 "pair": "prompt/ctp_prompt.json"}[kind]
    meta = json.loads((folder / meta_file).read_text())
    if kind == "compressed":  # as compress() records a local base and a local calibration file
        meta.update(base_model=str(tmp_path / "bases" / "my-base"), base_model_local=True)
        meta["compression"]["calib"] = str(tmp_path / "texts" / "notes.txt")
    else:  # as tune_prompt() records local training and validation files
        meta["prompt_config"].update(data=str(tmp_path / "texts" / "train.txt"),
                                     val_data=str(tmp_path / "texts" / "val.txt"))
    (folder / meta_file).write_text(json.dumps(meta, indent=2) + "\n")
    before = _tree(folder)
    assert artifacts["local"].encode() in before[meta_file]

    dry = push(folder, "alice/mine", dry_run=True, endpoint=hub.endpoint, token=TOKEN)
    try:
        staged = _tree(dry.staged)
    finally:
        shutil.rmtree(dry.staged)
    push(folder, "alice/mine", endpoint=hub.endpoint, token=TOKEN)
    uploaded = hub.files[("alice/mine", "main")]
    assert staged == uploaded  # the dry run shows the exact upload
    _assert_published(uploaded, folder, artifacts["local"])
    assert _tree(folder) == before  # the user's files keep their local paths
    sent = json.loads(uploaded[meta_file])
    if kind == "compressed":
        assert (sent["base_model"], sent["compression"]["calib"]) == ("my-base", "notes.txt")
        assert sent["base_model_local"] is True and sent["bits_per_weight"] == meta["bits_per_weight"]
    else:
        assert (sent["prompt_config"]["data"], sent["prompt_config"]["val_data"]) == ("train.txt", "val.txt")
        assert sent["model"] == "compressed" and sent["base_model"] == BASE
        assert sent["history"] == meta["history"] and sent["best_val_ppl"] == meta["best_val_ppl"]


def test_own_readme_is_kept(hub, artifacts, tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(artifacts["compressed"], folder)
    (folder / "README.md").write_text("# my own words\n")
    result = push(folder, "alice/mine", endpoint=hub.endpoint, token=TOKEN)
    assert result.readme_kept and hub.files[("alice/mine", "main")]["README.md"] == b"# my own words\n"
    assert (folder / "README.md").read_text() == "# my own words\n"


@pytest.mark.parametrize("status, words", [
    (401, ["401", "hf auth login", "HF_TOKEN"]),
    (403, ["403", "no permission to write to alice/x"]),
    (404, ["404", "not found"]),
])
def test_hub_errors_become_one_clear_line(hub, artifacts, status, words):
    # a server that echoes the token back must not get it into the message
    hub.fail = (status, {"error": f"bad credentials {TOKEN}"}, {})
    with pytest.raises(CTPError) as info:
        push(artifacts["prompt"], "alice/x", endpoint=hub.endpoint, token=TOKEN)
    message = str(info.value)
    assert all(w in message for w in words) and "\n" not in message and TOKEN not in message
    assert "bad credentials ***" in message


def test_existing_repo_without_write_access(hub, artifacts):
    hub.existing.add("bob/theirs")
    hub.fail, hub.fail_on = (403, {"error": "forbidden"}, {}), "/preupload/"
    with pytest.raises(CTPError, match=r"no permission to write to bob/theirs \(403 Forbidden at "
                                       r"POST /api/models/bob/theirs/preupload/main"):
        push(artifacts["prompt"], "bob/theirs", endpoint=hub.endpoint, token=TOKEN)
    assert hub.files == {}


def test_network_down_and_offline_mode(hub, artifacts, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CTPError, match="could not reach the Hub"):
        push(artifacts["prompt"], "alice/x", endpoint=f"http://127.0.0.1:{port}", token=TOKEN)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CTPError, match="HF_HUB_OFFLINE"):
        push(artifacts["prompt"], "alice/x", endpoint=hub.endpoint, token=TOKEN)
    assert hub.requests == []


def test_refusals_before_any_request(hub, artifacts, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CTPError, match=f"{tmp_path} is not a ctp folder"):
        push(tmp_path, "alice/x", endpoint=hub.endpoint, token=TOKEN)
    with pytest.raises(CTPError, match="is not a folder"):
        push(tmp_path / "missing", "alice/x", endpoint=hub.endpoint, token=TOKEN)
    for bad in ("tiny", "a/b/c", "alice/bad--name", ""):
        with pytest.raises(CTPError, match="repo id"):
            push(artifacts["compressed"], bad, endpoint=hub.endpoint, token=TOKEN)
    assert hub.requests == []


def test_card_metadata_from_the_json_files(tmp_path):
    """Hub datasets named, local ones left out; N:M and int8 tags; local bases not linked."""
    folder = tmp_path / "c"
    folder.mkdir()
    cfg = {"prune": "magnitude", "sparsity": 0.5, "pattern": "2:4", "quant": "int8", "calib": "c4"}
    report = {"base_model": "meta-llama/Llama-2-7b-hf", "compression": cfg, "label": "magnitude-2:4+int8",
              "calibration": {"source": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0},
              "base_fingerprint": "abc", "sparsity": {}, "bits_per_weight": 8.5}
    (folder / "ctp_compression.json").write_text(json.dumps(report))
    data = _card_data(build_card(folder))
    assert data["base_model"] == "meta-llama/Llama-2-7b-hf" and data["datasets"] == ["allenai/c4"]
    assert {"pruned", "magnitude", "2:4", "8-bit", "int8"} <= set(data["tags"]) and "4-bit" not in data["tags"]

    notes = tmp_path / "private" / "notes.txt"  # a local base and a local calibration file
    report.update(base_model=str(tmp_path / "my-base"), calibration={"source": "notes.txt"},
                  compression={**cfg, "prune": "none", "quant": "none", "calib": str(notes)})
    (folder / "ctp_compression.json").write_text(json.dumps(report))
    card = build_card(folder)
    data = _card_data(card)
    assert "base_model" not in data and "base_model_relation" not in data and "datasets" not in data
    assert data["tags"] == ["ctp"]
    assert str(tmp_path) not in card and "`my-base`" in card and "calib: notes.txt" in card
    report["base_model_local"] = True  # recorded by compress(): a relative folder name is no Hub id
    report["base_model"] = "models/llama"
    (folder / "ctp_compression.json").write_text(json.dumps(report))
    card = build_card(folder)
    assert "base_model" not in _card_data(card) and "models/llama" not in card and "`llama`" in card

    prompt = tmp_path / "p"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text("{}")
    (prompt / "ctp_prompt.json").write_text(json.dumps({
        "base_model": "Qwen/Qwen2-0.5B", "compression": None, "num_virtual_tokens": 8, "hidden_size": 16,
        "tokenizer_fingerprint": None, "base_fingerprint": None, "prompt_config": {"data": "wikitext2"},
        "training_data": {"source": "wikitext2"}, "validation_data": {"source": "ptb", "split": "validation"},
        "best_val_ppl": 10.5, "val_ppl_without_prompt": 11.25}))
    card = build_card(prompt)
    data = _card_data(card)
    assert data["datasets"] == ["wikitext", "ptb_text_only"] and data["base_model"] == "Qwen/Qwen2-0.5B"
    assert data["tags"] == ["ctp", "soft-prompt", "prompt-tuning"]
    assert "| with the prompt (best) | 10.5000 |" in card and "| 11.2500 |" in card

    pair = tmp_path / "pair"  # perplexities that `ctp stitch --ppl --out` recorded
    shutil.copytree(prompt, pair / "prompt")
    (pair / "ctp_compression.json").write_text(json.dumps({**report, "base_model": "Qwen/Qwen2-0.5B",
                                                           "compression": cfg}))
    (pair / "ctp_stitch.json").write_text(json.dumps({"model": "m", "prompt": "p",
                                                      "ppl": {"without_prompt": {"wikitext2": 12.0},
                                                               "with_prompt": {"wikitext2": 11.0}}}))
    card = build_card(pair)
    assert "| wikitext2 | 12.0000 | 11.0000 |" in card and "int8" in _card_data(card)["tags"]
    (pair / "ctp_compression.json").unlink()  # a dense target: the prompt's training copy is no tag
    data = _card_data(build_card(pair))
    assert data["base_model"] == "Qwen/Qwen2-0.5B" and "base_model_relation" not in data
    assert data["tags"] == ["ctp", "soft-prompt", "prompt-tuning"]


def test_cli_push_dry_run_upload_and_401(hub, artifacts):
    # a fresh process reads HF_ENDPOINT and HF_TOKEN itself; telemetry off: no agent-registry fetch
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = run_cli("push", str(artifacts["prompt"]), "--repo", "alice/p", "--dry-run", "--json", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    staged = Path(result["staged"])
    try:
        assert hub.requests == [] and "dry run, nothing uploaded" in done.stderr
        assert (staged / "README.md").read_text() == result["card"] and result["kind"] == "prompt"
        _assert_published(_tree(staged), artifacts["prompt"], artifacts["local"])
    finally:
        shutil.rmtree(staged)

    done = run_cli("push", str(artifacts["compressed"]), "--repo", "alice/c", "--private", "--revision", "v2",
                   "--commit-message", "hello", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["url"] == f"{hub.endpoint}/alice/c/tree/v2"
    assert hub.commits == [{"summary": "hello", "description": ""}] and ("alice/c", "v2") in hub.files
    create = next(r for r in hub.requests if r["path"] == "/api/repos/create")
    assert json.loads(create["body"])["visibility"] == "private"
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert TOKEN not in done.stdout + done.stderr

    hub.fail = (401, {"error": "Invalid credentials in Authorization header"}, {})
    done = run_cli("push", str(artifacts["prompt"]), "--repo", "alice/p", env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("ctp push: error: ") and done.stderr.count("\n") == 1  # needs httpx2 silenced
    assert "401" in done.stderr and "hf auth login" in done.stderr
    assert TOKEN not in done.stdout + done.stderr
    _assert_no_token(hub)
