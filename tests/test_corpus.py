"""Corpus sources: bundled demo, text folder, jsonl; the validation split; bad input."""

import json
import lzma
import shutil

import pytest
from conftest import DEMO, write_jsonl

from pgolf.data.corpus import CorpusConfig, build_corpus, read_jsonl, val_split
from pgolf.io import read_json


def build(tmp_path, **cfg):
    out, meta = tmp_path / "docs.jsonl", tmp_path / "docs.json"
    summary = build_corpus(CorpusConfig(**cfg), demo=DEMO, out=out, meta=meta)
    return summary, [json.loads(line)["text"] for line in out.open()], meta


def test_demo_corpus_is_the_bundled_addresses(tmp_path):
    summary, texts, meta = build(tmp_path, source="demo")
    sidecar = read_json(DEMO.with_name("sotu.json"))
    assert summary["count"] == len(texts) == 233 == sidecar["num_docs"]
    assert summary["text_bytes"] == sidecar["text_bytes"]
    assert read_json(meta)["origin"]["source_sha256"] == sidecar["source_sha256"]
    assert any("Fellow-Citizens" in t for t in texts)


def test_demo_corpus_is_verified_against_its_sidecar(tmp_path):
    tampered = tmp_path / "sotu.jsonl.xz"
    shutil.copy(DEMO.with_name("sotu.json"), tmp_path / "sotu.json")
    tampered.write_bytes(lzma.compress(b'{"text": "not the addresses"}\n'))
    with pytest.raises(ValueError, match=r"sotu.jsonl.xz: sha256 .* does not match"):
        build_corpus(CorpusConfig(source="demo"), demo=tampered, out=tmp_path / "d.jsonl",
                     meta=tmp_path / "d.json")
    assert not (tmp_path / "d.jsonl").exists()


def test_text_folder_one_document_per_file_in_name_order(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for name, text in [("b.txt", "second\n"), ("a.txt", "first é"), ("c.md", "ignored")]:
        (folder / name).write_text(text)
    summary, texts, _ = build(tmp_path, source="text", path=str(folder))
    assert texts == ["first é", "second\n"]
    assert summary["text_bytes"] == len("first é".encode()) + 7


def test_jsonl_source_keeps_text_only(tmp_path):
    src = tmp_path / "docs_selected.jsonl"
    src.write_text('{"text": "one", "id": 7}\n\n{"text": "two\\nlines"}\n')
    summary, texts, _ = build(tmp_path, source="jsonl", path=str(src))
    assert texts == ["one", "two\nlines"]
    assert summary["origin"]["source_sha256"]


@pytest.mark.parametrize("content,words", [
    ('{"text": "ok"}\n{"text": \n', ["docs_selected.jsonl:2", "not valid JSON"]),
    ('{"text": "ok"}\n{"body": "x"}\n', ["docs_selected.jsonl:2", 'string "text"']),
    ('{"text": 5}\n', ["docs_selected.jsonl:1"]),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, words):
    src = tmp_path / "docs_selected.jsonl"
    src.write_text(content)
    with pytest.raises(ValueError) as err:
        build(tmp_path, source="jsonl", path=str(src))
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "docs.jsonl").exists() and not (tmp_path / "docs.json").exists()


def test_empty_corpus_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match=r"empty.jsonl\) has no documents"):
        build(tmp_path, source="jsonl", path=str(src))
    (tmp_path / "txt").mkdir()
    with pytest.raises(ValueError, match="has no documents"):
        build(tmp_path, source="text", path=str(tmp_path / "txt"))
    assert not (tmp_path / "docs.jsonl").exists()


def test_missing_and_non_utf8_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"corpus file .*nope.jsonl: no such file"):
        build(tmp_path, source="jsonl", path=str(tmp_path / "nope.jsonl"))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8"):
        build(tmp_path, source="text", path=str(tmp_path / "txt"))


def test_config_errors():
    with pytest.raises(ValueError, match="unknown source 'web'"):
        CorpusConfig(source="web")
    with pytest.raises(ValueError, match="needs corpus.path"):
        CorpusConfig(source="jsonl")


def test_val_split_rules():
    corpus = {"count": 100, "origin": {"path": "x.jsonl"}}
    assert val_split(5, corpus) == 5
    assert val_split(None, {**corpus, "origin": {"docs_val": 7}}) == 7  # hub sidecar, as upstream
    with pytest.raises(ValueError, match=r"val_docs=50000 .* x.jsonl has 100"):
        val_split(None, corpus)  # upstream's 50,000 default does not fit a small corpus
    with pytest.raises(ValueError, match="val_docs=100"):
        val_split(100, corpus)


def test_read_jsonl_reads_xz(tmp_path):
    path = tmp_path / "d.jsonl.xz"
    path.write_bytes(lzma.compress(b'{"text": "a"}\n{"text": "b"}\n'))
    assert list(read_jsonl(path)) == ["a", "b"]
