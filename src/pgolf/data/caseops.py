"""CaseOps (upstream's lossless_caps_caseops_v1): ASCII capitalisation moved into reserved
control symbols, its exact inverse, and the bytes of original text each token stands for.

Over maximal runs of ASCII letters ("words"): a lowercase word is unchanged; an all-caps word of
two or more letters becomes ALLCAPS + the word in lowercase; any other word with capitals becomes
TITLE (when its first letter is a capital) + its lowercase first letter + the rest, each later
capital written CAPNEXT + its lowercase letter. A control symbol already in the text is escaped as
ESC + the symbol. Nothing else changes, so the transform is invertible and every character of the
original text appears in the transformed text with its own UTF-8 length: the original bytes of a
span of transformed text are its bytes less those of the markers (unescaped control symbols).
"""

import re

import numpy as np
import sentencepiece as spm

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CONTROLS = (TITLE, ALLCAPS, CAPNEXT, ESC)
NAMES = dict(zip(CONTROLS, ("TITLE", "ALLCAPS", "CAPNEXT", "ESC"), strict=True))
USER_DEFINED = 4  # ModelProto.SentencePiece.Type.USER_DEFINED

_WORD_OR_CONTROL = re.compile("[A-Za-z]+|[\ue001-\ue004]")
# transformed text as parts: an escaped symbol, a marker, a run of letters, a run of anything
# else, a dangling ESC
_PARTS = re.compile("\ue004([\ue001-\ue004])|([\ue001-\ue003])|([A-Za-z]+)"
                    "|([^A-Za-z\ue001-\ue004]+)|(\ue004)")
# one marker per match, at its start: ESC of an escape pair, or a lone control symbol
_MARKER = re.compile("\ue004[\ue001-\ue004]|[\ue001-\ue004]")


def _encode_match(match: re.Match) -> str:
    word = match.group()
    if word in CONTROLS:
        return ESC + word
    if word.islower():
        return word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + word.lower()
    head = TITLE if word[0].isupper() else ""
    rest = "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])
    return head + word[0].lower() + rest


def encode(text: str) -> str:
    """The CaseOps transform of `text`."""
    return _WORD_OR_CONTROL.sub(_encode_match, text)


def decode(text: str) -> str:
    """The inverse of `encode`; a ValueError for text no encoding produces (a marker that no
    letter follows, TITLE or ALLCAPS inside a word, a dangling ESC)."""
    out, mode, capnext, in_word, allcaps = [], None, False, False, False
    for match in _PARTS.finditer(text):
        escaped, marker, letters, other, dangling = match.groups()
        if letters:
            if not in_word:
                allcaps = mode == ALLCAPS
            first = letters[0].upper() if mode or capnext or allcaps else letters[0]
            out.append(first + (letters[1:].upper() if allcaps else letters[1:]))
            mode, capnext, in_word = None, False, True
        elif marker == CAPNEXT and not capnext:
            capnext = True
        elif marker and marker != CAPNEXT and not (in_word or mode or capnext):
            mode = marker
        elif (escaped or other) and not (mode or capnext):
            out.append(escaped or other)
            in_word = allcaps = False
        else:
            what = "a dangling ESC" if dangling else f"{NAMES.get(marker, 'a marker')} misplaced"
            raise ValueError(f"caseops: {what} at character {match.start()}")
    if mode or capnext:
        raise ValueError("caseops: a marker at the end of the text")
    return "".join(out)


def original_bytes(text: str, offsets) -> np.ndarray:
    """Per token of transformed `text`, whose pieces cover the character spans `offsets`
    ((begin, end) as SentencePiece's offset mapping gives them): the UTF-8 bytes of the original
    text it stands for. Characters no piece covers (whitespace the normaliser drops at the ends)
    count for no token, as in upstream's sidecar."""
    code = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    size = 1 + (code >= 0x80).astype(np.int64) + (code >= 0x800) + (code >= 0x10000)
    for match in _MARKER.finditer(text):
        size[match.start()] = 0
    cumulative = np.concatenate([[0], np.cumsum(size)])
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return cumulative[spans[:, 1]] - cumulative[spans[:, 0]]


def piece_types(sp: spm.SentencePieceProcessor) -> list[int]:
    """Each piece's type as the model file stores it (normal 1, unknown 2, control 3,
    user-defined 4, unused 5, byte 6): a small protobuf wire reader, since the Python API cannot
    tell a user-defined piece from a normal one."""
    data, pos, types = sp.serialized_model_proto(), 0, []
    while pos < len(data):
        key, pos = _varint(data, pos)
        if key & 7 == 2:
            length, pos = _varint(data, pos)
            if key >> 3 == 1:  # ModelProto.pieces
                types.append(_piece_type(data[pos:pos + length]))
            pos += length
        else:
            pos = _skip(data, pos, key & 7)
    return types


def _piece_type(message: bytes) -> int:
    pos, kind = 0, 1  # type defaults to NORMAL
    while pos < len(message):
        key, pos = _varint(message, pos)
        if key == (3 << 3):  # field 3 (type), varint
            kind, pos = _varint(message, pos)
        elif key & 7 == 2:
            length, pos = _varint(message, pos)
            pos += length
        else:
            pos = _skip(message, pos, key & 7)
    return kind


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _skip(data: bytes, pos: int, wire: int) -> int:
    if wire == 0:
        return _varint(data, pos)[1]
    if wire in (1, 5):
        return pos + (8 if wire == 1 else 4)
    raise ValueError(f"tokenizer model: unsupported protobuf wire type {wire}")


def reserved_controls(sp: spm.SentencePieceProcessor) -> list[str]:
    """The CaseOps control symbols the tokenizer reserves as user-defined pieces."""
    types = piece_types(sp)
    found = [c for c in CONTROLS if sp.piece_to_id(c) != sp.unk_id()]
    return [c for c in found if types[sp.piece_to_id(c)] == USER_DEFINED]


def check_tokenizer(sp: spm.SentencePieceProcessor, *, caseops: bool, where: str) -> None:
    """CaseOps text needs its four control symbols reserved as user-defined pieces (so no merge
    ever swallows one); a tokenizer that reserves them was built for CaseOps text."""
    reserved = reserved_controls(sp)
    if caseops and len(reserved) < len(CONTROLS):
        missing = [f"U+{ord(c):04X} {NAMES[c]}" for c in CONTROLS if c not in reserved]
        raise ValueError(f"{where}: tokenizer.caseops = true, but the model does not reserve the "
                         f"CaseOps control pieces {missing} as user-defined symbols")
    if not caseops and len(reserved) == len(CONTROLS):
        raise ValueError(f"{where}: the model reserves the CaseOps control pieces, so its shards "
                         "hold CaseOps text; set tokenizer.caseops = true")
