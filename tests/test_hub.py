"""The `hf` corpus source against a local stand-in of the Hugging Face hub.

huggingface_hub's real `hf_hub_download` runs unmodified; only its endpoint points at a small
HTTP server on 127.0.0.1 that answers HEAD and GET on
`/datasets/{repo_id}/resolve/{revision}/{path}` the way the hub does for a plain (non-Xet) file.
"""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from pgolf.data.corpus import CorpusConfig, build_corpus
from pgolf.data.hub import HubConfig, fetch_docs

REPO = "someone/parameter-golf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DOCS = ["first document", "zweites Dokument: Grüße", "третий документ", "第四个文档 ✓",
        "  fifth, over\ntwo lines\n"]


class FakeHub:
    """What the stand-in serves (`files`: path in the repo -> bytes) and what it was asked."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, url path)
        self.endpoint = ""


def make_handler(hub: FakeHub):
    prefix = f"/datasets/{REPO}/resolve/"

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.answer(body=False)

        def do_GET(self):
            self.answer(body=True)

        def answer(self, body: bool):
            path = unquote(self.path)
            hub.requests.append((self.command, path))
            _revision, _, name = path.removeprefix(prefix).partition("/")
            data = hub.files.get(name) if path.startswith(prefix) else None
            if data is None:  # what the hub sends for a missing file in an existing repo
                self.send_response(404)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Error-Message", "Entry not found")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            # No X-Linked-Size / X-Xet-Hash: huggingface_hub then downloads with a plain GET.
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    # Offline mode is read once at import; tokens and proxies would only leak into or reroute
    # requests to the stand-in.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HTTP_PROXY",
                "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    fake.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join()


def publish(hub: FakeHub, docs: list[str], **sidecar) -> bytes:
    """Serve `docs` as datasets/docs_selected.jsonl with a matching sidecar (overridable)."""
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs).encode()
    sidecar = {"num_docs": len(docs), "docs_val": 2,
               "docs_sha256": hashlib.sha256(data).hexdigest(), "shuffle_seed": 1337, **sidecar}
    hub.files["datasets/docs_selected.jsonl"] = data
    hub.files["datasets/docs_selected.source_manifest.json"] = json.dumps(sidecar).encode()
    return data


def hub_config(hub: FakeHub, tmp_path: Path, **kw) -> HubConfig:
    return HubConfig(repo_id=REPO, endpoint=hub.endpoint, cache_dir=str(tmp_path / "cache"), **kw)


def build(hub: FakeHub, tmp_path: Path, **kw) -> dict:
    cfg = CorpusConfig(source="hf", hf=hub_config(hub, tmp_path, **kw))
    return build_corpus(cfg, demo=Path(""), out=tmp_path / "docs.jsonl",
                        meta=tmp_path / "docs.json")


def test_hf_source_downloads_and_writes_corpus(hub, tmp_path):
    data = publish(hub, DOCS)
    build(hub, tmp_path)

    lines = (tmp_path / "docs.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == DOCS
    meta = json.loads((tmp_path / "docs.json").read_text())
    assert meta["count"] == 5
    assert meta["origin"]["source"] == "hf"
    assert meta["origin"]["num_docs"] == 5
    assert meta["origin"]["docs_val"] == 2
    assert meta["origin"]["docs_sha256"] == hashlib.sha256(data).hexdigest()
    # Both files came over HTTP from the stand-in (HEAD for metadata, GET for the bytes).
    base = f"/datasets/{REPO}/resolve/main/datasets"
    for name in ("docs_selected.jsonl", "docs_selected.source_manifest.json"):
        assert ("HEAD", f"{base}/{name}") in hub.requests
        assert ("GET", f"{base}/{name}") in hub.requests


def test_sha_mismatch_is_rejected(hub, tmp_path):
    data = publish(hub, DOCS, docs_sha256="f" * 64)
    with pytest.raises(ValueError) as err:
        build(hub, tmp_path)
    docs = (tmp_path / "cache" / "datasets--someone--parameter-golf" / "snapshots" / COMMIT
            / "datasets" / "docs_selected.jsonl")
    assert str(docs) in str(err.value)
    assert hashlib.sha256(data).hexdigest() in str(err.value)
    assert "f" * 64 in str(err.value)
    assert not (tmp_path / "docs.jsonl").exists()


def test_missing_file_on_hub_names_repo_and_file(hub, tmp_path):
    publish(hub, DOCS)
    del hub.files["datasets/docs_selected.jsonl"]
    with pytest.raises(ValueError, match=rf"{REPO}.*no file datasets/docs_selected\.jsonl"):
        fetch_docs(hub_config(hub, tmp_path))
    assert ("HEAD", f"/datasets/{REPO}/resolve/main/datasets/docs_selected.jsonl") in hub.requests


def test_num_docs_mismatch_is_rejected(hub, tmp_path):
    publish(hub, DOCS, num_docs=6)
    with pytest.raises(ValueError, match=r"5 documents.*num_docs=6"):
        build(hub, tmp_path)
    assert not (tmp_path / "docs.json").exists()
    assert not (tmp_path / "docs.jsonl").exists()


def test_revision_is_requested(hub, tmp_path):
    publish(hub, DOCS)
    docs, origin = fetch_docs(hub_config(hub, tmp_path, revision="v1"))
    assert origin["revision"] == "v1"
    assert docs.read_bytes() == hub.files["datasets/docs_selected.jsonl"]
    assert ("GET", f"/datasets/{REPO}/resolve/v1/datasets/docs_selected.jsonl") in hub.requests
    assert not any("/resolve/main/" in path for _, path in hub.requests)


def test_unreachable_hub_is_not_reported_as_missing_file(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    publish(hub, DOCS)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the hub cannot be asked at all
    with pytest.raises(ValueError) as err:
        fetch_docs(hub_config(hub, tmp_path))
    message = str(err.value)
    assert REPO in message and "datasets/docs_selected.source_manifest.json" in message
    assert "offline mode" in message
    assert "no file" not in message
    assert hub.requests == []
