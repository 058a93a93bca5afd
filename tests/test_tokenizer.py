"""Tokenizer options (checked by behaviour) and the byte accounting BPB divides by."""

import numpy as np
import pytest
import sentencepiece as spm

from pgolf.data.bytecount import ByteLUT, count_bytes, load_tokenizer
from pgolf.data.tokenizer import TokenizerConfig, train_tokenizer, training_sentences


@pytest.fixture(scope="module")
def sp(tokenizer_path):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


def test_special_ids_as_upstream(sp):
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256  # byte fallback
    assert sp.vocab_size() == 384


def test_trainer_options_by_behaviour(sp):
    pieces = sp.encode("The year 1789", out_type=str)
    assert not pieces[0].startswith("\u2581")  # no dummy prefix
    assert pieces[-4:] == ["1", "7", "8", "9"]  # split digits
    assert sp.encode("\u2603", out_type=str) == ["<0xE2>", "<0x98>", "<0x83>"]  # byte fallback
    assert sp.decode(sp.encode("\ufb01nance")) == "finance"  # nmt_nfkc folds the ligature
    assert sp.decode(sp.encode("ok \u2603 1789")) == "ok \u2603 1789"


def hand_lut():
    # ids: 0 <pad>, 1 <s>, 2 "▁the" (3 bytes + space), 3 "re" (2), 4 <0xE2> byte piece, 5 "é" (2)
    return ByteLUT(base_bytes=np.array([0, 0, 3, 2, 1, 2, 0]),
                   has_leading_space=np.array([0, 0, 1, 0, 0, 0, 0], dtype=bool),
                   is_boundary=np.array([1, 1, 0, 0, 0, 0, 1], dtype=bool))


def test_byte_accounting_by_hand():
    lut = hand_lut()
    # <s> ▁the re ▁the <0xE2> é <s> ▁the 6(beyond vocab, boundary) ▁the
    tokens = [1, 2, 3, 2, 4, 5, 1, 2, 6, 2]
    # BOS target 0; ▁the after BOS: no space -> 3; re 2; ▁the after re -> 4; byte 1; é 2;
    # BOS 0; ▁the after BOS 3; boundary id 0; ▁the after a boundary -> 3
    assert count_bytes(tokens, hand_lut()).tolist() == [0, 3, 2, 4, 1, 2, 0, 3, 0, 3]
    # the token before the stream decides the first token's space
    assert count_bytes([2], lut, prev=3).tolist() == [4]
    assert count_bytes([2], lut, prev=1).tolist() == [3]
    assert count_bytes([2], lut).tolist() == [3]


def test_lut_from_tokenizer_matches_pieces(sp):
    lut = ByteLUT.from_tokenizer(sp, table_size=sp.vocab_size() + 5)
    assert lut.is_boundary[[0, 1, 2, 3]].all() and lut.is_boundary[sp.vocab_size():].all()
    byte_id = sp.piece_to_id("<0xE2>")
    assert lut.base_bytes[byte_id] == 1 and not lut.is_boundary[byte_id]
    for i in range(260, sp.vocab_size()):
        piece = sp.id_to_piece(i)
        assert lut.has_leading_space[i] == piece.startswith("\u2581")
        assert lut.base_bytes[i] == len(piece.lstrip("\u2581").encode())


@pytest.mark.parametrize("text", ["The Congress shall assemble.", "naïve café, 1789 \u2603!",
                                  "Fellow-Citizens of the Senate:  two  spaces"])
def test_document_bytes_equal_its_normalised_utf8_size(sp, text):
    # A document is BOS + tokens; the bytes charged are those of the text SentencePiece normalised
    # (nmt_nfkc also folds runs of spaces), which is what decode returns.
    tokens = [sp.bos_id(), *sp.encode(text)]
    charged = count_bytes(tokens, ByteLUT.from_tokenizer(sp)).sum()
    assert charged == len(sp.decode(tokens[1:]).encode("utf-8"))
    folded = "  " in text
    assert (charged == len(text.encode("utf-8"))) == (not folded)


def test_long_documents_are_split_at_spaces_for_training():
    text = " ".join(f"word{i}" for i in range(2000))
    pieces = list(training_sentences([text, "", "\x00 short"], max_bytes=200, split=True))
    assert all(len(p.encode()) <= 200 for p in pieces)
    assert " ".join(pieces[:-1]).split() == text.split()
    assert pieces[-1] == "short"  # NUL -> space, stripped; the empty document skipped
    assert list(training_sentences([text], max_bytes=200, split=False)) == [text]


def test_provided_model_checks(tmp_path, tokenizer_path):
    assert load_tokenizer(tokenizer_path, vocab_size=384).vocab_size() == 384
    with pytest.raises(ValueError, match=r"vocab size 384.*tokenizer.vocab_size=1024"):
        load_tokenizer(tokenizer_path, vocab_size=1024)
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"junk.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")


def test_vocab_over_uint16_is_refused(tmp_path, sotu_texts):
    with pytest.raises(ValueError, match="70000 does not fit uint16"):
        train_tokenizer(sotu_texts, tmp_path / "t.model", cfg=TokenizerConfig(vocab_size=70000))
    assert not (tmp_path / "t.model").exists()
