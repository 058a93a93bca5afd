"""CaseOps: the transform and its inverse, the reserved control pieces, the val byte sidecar, and
BPB dividing by the bytes of the original text in every consumer."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import DEMO, write_jsonl

from pgolf.data import caseops
from pgolf.data.bytecount import ByteLUT, SidecarBytes, byte_counter
from pgolf.data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE
from pgolf.data.corpus import read_jsonl
from pgolf.data.encode import ShardsConfig, encode_corpus, import_shards
from pgolf.data.shards import list_shards, list_sidecars, read_shard, write_shard
from pgolf.data.tokenizer import TokenizerConfig, build_tokenizer, train_tokenizer
from pgolf.eval.bpb import evaluate, val_stream
from pgolf.eval.sliding import sliding_bpb
from pgolf.eval.ttt import TTTConfig, ttt_bpb
from pgolf.quant.sweep import load_subset

CPU = torch.device("cpu")

# --- the transform -----------------------------------------------------------------------------
# Expected encodings written by hand from the rule (parameter-golf.md 2.4; upstream's
# encode_lossless_caps_v2, which lossless_caps_caseops_v1 names).
BY_HAND = [
    ("the cat", "the cat"),
    ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),
    ("A I a", f"{TITLE}a {TITLE}i a"),  # a lone capital is a title-case word
    ("iPhone", f"i{CAPNEXT}phone"),
    ("McDonald ABc", f"{TITLE}mc{CAPNEXT}donald {TITLE}a{CAPNEXT}bc"),
    ("HTTPServer", f"{TITLE}h{CAPNEXT}t{CAPNEXT}t{CAPNEXT}p{CAPNEXT}server"),
    ("abc123DEF x2Y", f"abc123{ALLCAPS}def x2{TITLE}y"),  # digits end a word
    ("ÉCOLE Élan naïve", f"É{ALLCAPS}cole Élan naïve"),  # only ASCII letters are touched
    (f"x{TITLE}y{ESC}", f"x{ESC}{TITLE}y{ESC}{ESC}"),  # control symbols in the text are escaped
    ("", ""),
]
TRICKY = ["", " ", "A", "AB", "aB", "Ab", "ALL CAPS TEXT!", "MiXeD cAsE wOrDs", "1789, 2024",
          "Ünïcödé ÀÉÎ ß ΣΑΣ Привет 日本語 ☃", "\n\n\tTabs\r\n", "a" * 50 + "B" * 50,
          TITLE + ALLCAPS + CAPNEXT + ESC, ESC * 3 + "Ab" + TITLE, "x\u0301Y\ufeffZ"]


@pytest.mark.parametrize(("text", "encoded"), BY_HAND)
def test_encode_by_hand(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text


@pytest.mark.parametrize("text", TRICKY)
def test_inverse_on_tricky_strings(text):
    encoded = caseops.encode(text)
    assert caseops.decode(encoded) == text
    assert not any(c.isascii() and c.isupper() for c in encoded)  # no ASCII capital survives


def test_inverse_on_random_strings():
    alphabet = list("aZbYz09 .\n-é") + list(caseops.CONTROLS)
    rng = np.random.default_rng(0)
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 30)))
        assert caseops.decode(caseops.encode(text)) == text


def test_inverse_on_the_demo_corpus():
    docs = list(read_jsonl(DEMO))
    assert len(docs) == 233
    for doc in docs:
        assert caseops.decode(caseops.encode(doc)) == doc


@pytest.mark.parametrize("bad", [TITLE, f"{TITLE} a", f"a{TITLE}b", ESC, f"{ALLCAPS}1",
                                 f"{CAPNEXT}{CAPNEXT}a", f"{ESC}x", f"a{CAPNEXT}"])
def test_decode_refuses_what_no_encoding_produces(bad):
    with pytest.raises(ValueError, match="caseops"):
        caseops.decode(bad)


def test_original_bytes_by_hand():
    # "É" ALLCAPS "cole " ESC TITLE "x" in pieces [É ALLCAPS c][ole ][ESC][TITLE x]: É 2 bytes,
    # markers 0, letters 1, an escaped symbol its 3 UTF-8 bytes
    text = f"É{ALLCAPS}cole {ESC}{TITLE}x"
    offsets = [(0, 3), (3, 7), (7, 8), (8, 10)]
    assert caseops.original_bytes(text, offsets).tolist() == [3, 4, 0, 4]
    assert sum(caseops.original_bytes(text, offsets)) == len("ÉCOLE \ue001x".encode())
    # byte-fallback pieces of one character: the last carries it, the others are empty spans
    assert caseops.original_bytes("☃", [(0, 0), (0, 0), (0, 1)]).tolist() == [0, 0, 3]


# --- the tokenizer -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caseops_tokenizer(tmp_path_factory, sotu_texts):
    path = tmp_path_factory.mktemp("caseops") / "tokenizer.model"
    train_tokenizer(sotu_texts[20:], path, cfg=TokenizerConfig(vocab_size=400, caseops=True),
                    threads=2)
    return path


def test_piece_types_agree_with_the_api(tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    types = caseops.piece_types(sp)
    assert len(types) == sp.vocab_size()
    for i, kind in enumerate(types):
        expected = (3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i)
                    else 1)
        assert kind == expected, (i, sp.id_to_piece(i))


def test_control_symbols_are_reserved_pieces(caseops_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(caseops_tokenizer))
    # as the record's model: pad, bos, eos, unk, then the four controls (ids 0-7)
    assert [sp.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>",
                                                     *caseops.CONTROLS]
    assert caseops.piece_types(sp)[4:8] == [caseops.USER_DEFINED] * 4
    ids = sp.encode(caseops.encode("The NASA Launch of iPhone"))
    assert ids.count(sp.piece_to_id(TITLE)) == 2 and ids.count(sp.piece_to_id(CAPNEXT)) == 1
    assert caseops.decode(sp.decode(ids)) == "The NASA Launch of iPhone"
    caseops.check_tokenizer(sp, caseops=True, where="here")
    with pytest.raises(ValueError, match="set tokenizer.caseops = true"):
        caseops.check_tokenizer(sp, caseops=False, where="here")


def test_a_provided_model_without_the_pieces_is_refused(tmp_path, tokenizer_path):
    cfg = TokenizerConfig(vocab_size=384, model=str(tokenizer_path), caseops=True)
    with pytest.raises(ValueError, match=r"tokenizer.model .*tokenizer.caseops = true, but the "
                                         r"model does not reserve .*U\+E001 TITLE"):
        build_tokenizer(cfg, docs=None, corpus=None, val_docs=None, out=tmp_path / "t.model",
                        meta=tmp_path / "t.json")


# --- shards and sidecar ------------------------------------------------------------------------
VAL = 3


@pytest.fixture(scope="module")
def texts(sotu_texts):
    """Val documents without leading or trailing whitespace, then train documents."""
    docs = [t for t in sotu_texts[:12] if t == t.strip()][:VAL] + sotu_texts[12:16]
    assert len(docs) == VAL + 4
    return docs


@pytest.fixture(scope="module")
def caseops_shards(tmp_path_factory, texts, caseops_tokenizer):
    root = tmp_path_factory.mktemp("caseops_shards")
    docs = write_jsonl(root / "docs.jsonl", texts)
    summary = encode_corpus(docs, caseops_tokenizer, root / "shards", corpus={"count": len(texts)},
                            cfg=ShardsConfig(val_docs=VAL, shard_tokens=30_000), caseops_on=True)
    return summary, root / "shards"


def raw_bytes(docs) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


class ZeroLoss(torch.nn.Module):
    """A model whose NLL is 0 everywhere: only the token and byte totals of a result matter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets, reduction="mean"):
        return (self.w * 0).expand(targets.shape) + 0.0


def test_sidecar_bytes_are_the_original_utf8_bytes(caseops_shards, texts, caseops_tokenizer):
    summary, folder = caseops_shards
    stream, counter = val_stream(folder), byte_counter(folder, caseops_tokenizer)
    assert isinstance(counter, SidecarBytes) and len(counter.values) == len(stream)
    assert counter.values[stream == 1].tolist() == [0] * VAL  # BOS = 0
    val_bytes = raw_bytes(texts[:VAL])
    assert int(counter.values.sum()) == val_bytes == summary["splits"]["val"]["bpb_bytes"]
    # the eval's byte total over the full val stream: one window holding every target
    result = evaluate(ZeroLoss(), stream, counter, seq_len=len(stream) - 1, batch_seqs=1,
                      device=CPU)
    assert (result["tokens"], result["bytes"]) == (len(stream) - 1, val_bytes)
    # the transformed text is longer (markers): BPB on its bytes would be too low
    lut = ByteLUT.from_tokenizer(spm.SentencePieceProcessor(model_file=str(caseops_tokenizer)))
    assert evaluate(ZeroLoss(), stream, lut, seq_len=len(stream) - 1, batch_seqs=1,
                    device=CPU)["bytes"] > val_bytes


def test_sidecars_parallel_the_val_shards(caseops_shards):
    summary, folder = caseops_shards
    shards, sidecars = list_shards(folder, "val"), list_sidecars(folder)
    assert len(shards) == len(sidecars) > 1  # the val stream crossed a shard boundary
    assert [p.name for p in sidecars] == [f"fineweb_val_bytes_{i:06d}.bin"
                                          for i in range(len(shards))]
    assert [len(read_shard(p)) for p in shards] == [len(read_shard(p)) for p in sidecars]
    assert summary["caseops"] and len(summary["splits"]["val"]["sidecars"]) == len(sidecars)
    assert summary["splits"]["train"]["bpb_bytes"] is None  # train text has no sidecar
    assert not list(folder.glob("train_bytes*")) and not list_sidecars(folder.parent)


def test_the_tokens_spell_the_transformed_documents(caseops_shards, texts, caseops_tokenizer):
    _, folder = caseops_shards
    sp = spm.SentencePieceProcessor(model_file=str(caseops_tokenizer))
    expected = [[sp.bos_id(), *sp.encode(caseops.encode(t))] for t in texts[:VAL]]
    assert val_stream(folder).tolist() == sum(expected, [])


def test_edge_whitespace_belongs_to_no_token(tmp_path, caseops_tokenizer, sotu_texts):
    # As in upstream's sidecar: SentencePiece's normaliser drops leading and trailing whitespace,
    # so no piece's surface covers it and no token is charged for it.
    texts = [" Leading space.", "Trailing  \n", "Inner  runs\n\nstay, \U0001F600 \u2603 \ufb01 "
             "ÜBER iOS counted."] + sotu_texts[12:14]
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    encode_corpus(docs, caseops_tokenizer, tmp_path / "s", corpus={"count": len(texts)},
                  cfg=ShardsConfig(val_docs=3, shard_tokens=10_000), caseops_on=True)
    counter = byte_counter(tmp_path / "s", caseops_tokenizer)
    assert int(counter.values.sum()) == raw_bytes(t.strip() for t in texts[:3])


def test_lut_path_counts_the_normalised_text(tmp_path, texts, tokenizer_path):
    # Without CaseOps, BPB divides by the bytes of the text SentencePiece normalised (nmt_nfkc).
    # On these demo documents that is their raw size too.
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    summary = encode_corpus(docs, tokenizer_path, tmp_path / "s", corpus={"count": len(texts)},
                            cfg=ShardsConfig(val_docs=VAL, shard_tokens=30_000))
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    stream, counter = val_stream(tmp_path / "s"), byte_counter(tmp_path / "s", tokenizer_path)
    assert isinstance(counter, ByteLUT) and not list_sidecars(tmp_path / "s")
    result = evaluate(ZeroLoss(), stream, counter, seq_len=len(stream) - 1, batch_seqs=1,
                      device=CPU)
    normalised = raw_bytes(sp.decode(sp.encode(t)) for t in texts[:VAL])
    assert result["bytes"] == normalised == summary["splits"]["val"]["bpb_bytes"]
    assert normalised == raw_bytes(texts[:VAL])
    assert "caseops" not in summary


# The LUT path's exceptions: runs of whitespace fold to one space, NFKC rewrites characters
# (a ligature, a fraction, full-width letters), an inner BOM becomes a space. The sidecar counts
# the text as written.
EXCEPTIONS = [("two  spaces\n\nand lines", -2), ("\ufb01ne", -1), ("\u00bd cup", 3),
              ("\uff21\uff22 full", -4), ("x\ufeffy", -2)]


@pytest.mark.parametrize(("text", "lut_minus_raw"), EXCEPTIONS)
def test_where_the_lut_and_the_sidecar_part(tmp_path, tokenizer_path, caseops_tokenizer,
                                            sotu_texts, text, lut_minus_raw):
    texts, found = [text, *sotu_texts[12:14]], {}
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    for name, model, on in (("lut", tokenizer_path, False), ("sidecar", caseops_tokenizer, True)):
        encode_corpus(docs, model, tmp_path / name, corpus={"count": 3}, caseops_on=on,
                      cfg=ShardsConfig(val_docs=1, shard_tokens=10_000))
        stream = val_stream(tmp_path / name)
        found[name] = evaluate(ZeroLoss(), stream, byte_counter(tmp_path / name, model),
                               seq_len=len(stream) - 1, batch_seqs=1, device=CPU)["bytes"]
    assert found["sidecar"] == raw_bytes([text])
    assert found["lut"] - found["sidecar"] == lut_minus_raw


def test_every_mode_and_the_sweep_read_the_sidecar_at_the_targets(caseops_shards,
                                                                 caseops_tokenizer):
    _, folder = caseops_shards
    stream, counter = val_stream(folder), byte_counter(folder, caseops_tokenizer)
    seq_len, chunk = 64, 256
    n = (len(stream) - 1) // seq_len * seq_len
    common = dict(seq_len=seq_len, batch_seqs=5, device=CPU)
    results = [evaluate(ZeroLoss(), stream, counter, **common),
               sliding_bpb(ZeroLoss(), stream, counter, stride=16, chunk_tokens=chunk, **common),
               ttt_bpb(ZeroLoss(), stream, counter, stride=16, cfg=TTTConfig(chunk_tokens=chunk,
                       lr=0.0, epochs=1), **common)]
    for result in results:
        assert result["bytes"] == int(counter.values[1:n + 1].sum())
    for result in results[1:]:
        per_chunk = [int(counter.values[lo + 1:min(lo + chunk, n) + 1].sum())
                     for lo in range(0, n, chunk)]
        assert result["chunks"]["bytes"] == per_chunk
    subset = load_subset(folder, caseops_tokenizer, 400, windows=3, seq_len=seq_len,
                         batch_seqs=2)
    assert subset.num_bytes == int(counter.values[1:3 * seq_len + 1].sum())


# --- importing an upstream CaseOps folder ------------------------------------------------------
def upstream_copy(folder, target, *, sidecars=True):
    target.mkdir()
    for split in ("val", "train"):
        for i, path in enumerate(list_shards(folder, split)):
            os.link(path, target / f"fineweb_{split}_{i:06d}.bin")
    for path in list_sidecars(folder) if sidecars else []:
        os.link(path, target / path.name)
    return target


def test_import_picks_up_the_sidecar(caseops_shards, tmp_path, caseops_tokenizer):
    summary, folder = caseops_shards
    upstream = upstream_copy(folder, tmp_path / "fineweb10B_sp400_caseops")
    imported = import_shards(upstream, caseops_tokenizer, tmp_path / "linked", caseops_on=True)
    assert imported["caseops"]
    for key in ("docs", "tokens", "bpb_bytes"):
        assert imported["splits"]["val"][key] == summary["splits"]["val"][key], key
    ours = byte_counter(folder, caseops_tokenizer).values
    assert np.array_equal(byte_counter(tmp_path / "linked", caseops_tokenizer).values, ours)
    assert (tmp_path / "linked" / "fineweb_val_bytes_000000.bin").is_symlink()


def test_import_without_a_sidecar_names_folder_and_key(caseops_shards, tmp_path,
                                                       caseops_tokenizer):
    upstream = upstream_copy(caseops_shards[1], tmp_path / "up", sidecars=False)
    with pytest.raises(ValueError, match=rf"shard folder {upstream}: no validation byte sidecar"
                                         r".*tokenizer.caseops = true"):
        import_shards(upstream, caseops_tokenizer, tmp_path / "out", caseops_on=True)


def test_a_sidecar_of_the_wrong_length_names_both_files(caseops_shards, tmp_path,
                                                        caseops_tokenizer):
    upstream = upstream_copy(caseops_shards[1], tmp_path / "up")
    sidecar = upstream / "fineweb_val_bytes_000000.bin"
    short = read_shard(sidecar)[:-1].copy()
    sidecar.unlink()
    write_shard(sidecar, short)
    tokens = len(read_shard(upstream / "fineweb_val_000000.bin"))
    with pytest.raises(ValueError, match=rf"byte sidecar {sidecar} holds {tokens - 1} entries, "
                                         rf"but its val shard .*val_000000.bin holds {tokens}"):
        import_shards(upstream, caseops_tokenizer, tmp_path / "out", caseops_on=True)


def test_a_shard_folder_missing_a_sidecar_is_refused(caseops_shards, tmp_path,
                                                     caseops_tokenizer):
    folder = tmp_path / "shards"
    folder.mkdir()
    for path in [*list_shards(caseops_shards[1], "val"), list_sidecars(caseops_shards[1])[0]]:
        os.link(path, folder / path.name)
    with pytest.raises(ValueError, match=r"1 byte sidecar files .* for \d+ val shards"):
        byte_counter(folder, caseops_tokenizer)


def test_tokenizer_and_caseops_must_agree(tmp_path, caseops_shards, tokenizer_path,
                                          caseops_tokenizer, texts):
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    kwargs = dict(corpus={"count": len(texts)}, cfg=ShardsConfig(val_docs=VAL))
    with pytest.raises(ValueError, match=rf"tokenizer model {tokenizer_path}: tokenizer.caseops "
                                         "= true, but the model does not reserve"):
        encode_corpus(docs, tokenizer_path, tmp_path / "a", caseops_on=True, **kwargs)
    with pytest.raises(ValueError, match="set tokenizer.caseops = true"):
        import_shards(upstream_copy(caseops_shards[1], tmp_path / "up"), caseops_tokenizer,
                      tmp_path / "b")


def test_a_caseops_folder_that_lost_its_sidecar_is_refused(caseops_shards, tmp_path,
                                                           caseops_tokenizer):
    summary, source = caseops_shards
    folder = tmp_path / "shards"
    folder.mkdir()
    for path in list_shards(source, "val"):
        os.link(path, folder / path.name)
    (tmp_path / "shards.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=rf"shard folder {folder}: no byte sidecar .*"
                                         r"shards.json records tokenizer.caseops = true"):
        byte_counter(folder, caseops_tokenizer)
