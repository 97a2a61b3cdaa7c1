"""A SentencePiece model (`tokenizer.model`) as a Hugging Face fast tokenizer (`tokenizer.json`), so
that `transformers.AutoTokenizer` loads the tokenizer of an export trained with it.

The models `python -m tokenizer train` writes keep text as it is (identity normalisation, no dummy
prefix, whitespace kept, byte fallback), and SentencePiece splits no words when it encodes; so the
fast tokenizer is: spaces replaced by "▁", the model (same pieces, same ids), byte fallback, and a
decoder that undoes the three. Other normalisations are refused, naming what the model does.

- BPE: SentencePiece merges the adjacent pair whose merged piece scores highest; the fast BPE
  applies merges by rank, so each piece's splits into two vocabulary pieces become merges ranked by
  the piece's score (the order transformers' own SentencePiece converter uses). Same ids on real
  text (the tests encode Python's standard library both ways).
- Unigram: the same pieces and scores; both find a segmentation of the highest total score. Where
  several have exactly that score (permutations of the same pieces, e.g. in runs of indentation),
  SentencePiece and Hugging Face may pick different ones, and SentencePiece's float32 sums can
  also tip a near tie in a long document: a few documents in a hundred differ there, never in
  total score.

Control, unknown and byte pieces (`<s>`, `</s>`, `<unk>`, `<0x41>`) never match text in
SentencePiece: in the fast tokenizer they are special tokens, left out of the BPE merges, and score
far below every other piece in the unigram lattice, so text spelling them is split as text.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

# ModelProto field numbers (sentencepiece_model.proto): trainer_spec = 2, its model_type = 3.
_TRAINER_SPEC, _MODEL_TYPE = 2, 3
_UNIGRAM, _BPE = 1, 2  # TrainerSpec.ModelType; UNIGRAM is the proto default
# Characters that a normalising model would change (NFKC: ligature, full-width letter,
# no-break space) and whitespace that a dummy prefix or whitespace clean-up would touch.
_PROBE = "  a\u00a0\ufb01\uff21  b  "


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _proto_field(buf: bytes, number: int) -> int | bytes | None:
    """The last value of field `number` of a serialised protobuf message (protobuf's wire format:
    the `protobuf` package that sentencepiece_model_pb2 needs may be missing or of another version)."""
    found, i = None, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:  # varint
            value, i = _varint(buf, i)
        elif wire == 2:  # length-delimited
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):  # fixed 64 / 32 bits
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if key >> 3 == number:
            found = value
    return found


def sentencepiece_to_hf(model_file: str | Path) -> Tokenizer:
    """The fast tokenizer of `model_file` (module docstring); ValueError naming the file when the
    model normalises text or is neither BPE nor unigram."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    normalized = sp.normalize(_PROBE)
    if normalized != _PROBE.replace(" ", "▁"):
        raise ValueError(f"{model_file}: the SentencePiece model normalises text ({_PROBE!r} -> {normalized!r}); only "
                         "models that keep it as it is (identity normalisation, no dummy prefix, whitespace kept, as "
                         "`python -m tokenizer train` writes them) convert to tokenizer.json")
    trainer_spec = _proto_field(sp.serialized_model_proto(), _TRAINER_SPEC) or b""
    model_type = _proto_field(trainer_spec, _MODEL_TYPE) or _UNIGRAM
    ids = range(sp.get_piece_size())
    pieces = [sp.id_to_piece(i) for i in ids]
    special = [i for i in ids if sp.is_control(i) or sp.is_unknown(i)]
    not_text = {pieces[i] for i in ids if i in special or sp.is_byte(i)}
    byte_fallback = any(sp.is_byte(i) for i in ids)
    unk = pieces[sp.unk_id()]
    if model_type == _UNIGRAM:
        floor = min(sp.get_score(i) for i in ids) - 1000.0  # no text path through a non-text piece
        scores = [(p, floor if p in not_text else sp.get_score(i)) for i, p in zip(ids, pieces)]
        model = models.Unigram(scores, unk_id=sp.unk_id(), byte_fallback=byte_fallback)
    elif model_type == _BPE:
        vocab = {p: i for i, p in zip(ids, pieces)}
        merges = []  # (merged piece's score, left id, right id, left, right)
        for i, piece in zip(ids, pieces):
            if piece in not_text:
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab and not {left, right} & not_text:
                    merges.append((-sp.get_score(i), vocab[left], vocab[right], left, right))
        merges.sort()
        model = models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True,
                           byte_fallback=byte_fallback)
    else:
        raise ValueError(f"{model_file}: SentencePiece model type {model_type} (word or char) has no fast "
                         "tokenizer form here; BPE and unigram models convert")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if byte_fallback else []) + [decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True) for i in special])
    return tok
