"""Text tokenizers: SentencePiece (trained on our captions) and BERT WordPiece (for UNITER imports).

Both return, beside the ids, the index of the whitespace-split word each token belongs to, so
word-level annotations (word -> region) can be carried to tokens.
"""
from __future__ import annotations

import io
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import sentencepiece as spm

from pipeline.errors import UserError

SPECIAL_PIECES = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    word_index: list[int]


class Tokenizer(Protocol):
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int

    def encode(self, text: str, max_len: int) -> Encoded: ...


def _assemble(word_pieces: list[list[int]], cls_id: int, sep_id: int, max_len: int) -> Encoded:
    """[CLS] + pieces of each word + [SEP], truncating word pieces so the total fits max_len."""
    if max_len < 2:
        raise UserError(f"max_text_len={max_len} is too small: it must leave room for [CLS] and [SEP] (>= 2)")
    budget = max_len - 2
    ids, word_index = [cls_id], [-1]
    for w, pieces in enumerate(word_pieces):
        take = pieces[: budget - (len(ids) - 1)]
        ids.extend(take)
        word_index.extend([w] * len(take))
        if len(ids) - 1 >= budget:
            break
    ids.append(sep_id)
    word_index.append(-1)
    return Encoded(ids, word_index)


class SentencePieceTokenizer:
    """SentencePiece unigram model with [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4."""

    def __init__(self, path: str | os.PathLike | None = None, *, model_proto: bytes | None = None):
        if model_proto is None:
            if path is None or not Path(path).is_file():
                raise UserError(f"tokenizer model {path} not found: train one with "
                                "SentencePieceTokenizer.train or pass the path of an existing .model file")
            model_proto = Path(path).read_bytes()
        self.path = Path(path) if path is not None else None
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self._sp.piece_to_id(p) for p in SPECIAL_PIECES)
        if (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id) != (0, 1, 2, 3, 4):
            raise UserError(f"tokenizer model {path} does not have [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4: "
                            "retrain it with SentencePieceTokenizer.train")
        self.vocab_size = self._sp.get_piece_size()

    @classmethod
    def train(cls, texts: Iterable[str], out_path: str | os.PathLike,
              vocab_size: int) -> "SentencePieceTokenizer":
        """Train on `texts` (one sentence each) and write the model atomically to `out_path`."""
        out_path = Path(out_path)
        model = io.BytesIO()
        sentences = (t.strip() for t in texts if t and t.strip())
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size,
                # BPE, not unigram: on small regular caption sets (the synthetic scenes) unigram pruning
                # collapsed to ~50 mostly single-character pieces; BPE keeps merging up to whole words.
                model_type="bpe", character_coverage=1.0, normalization_rule_name="nmt_nfkc_cf",
                pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
                control_symbols=list(SPECIAL_PIECES[2:]), hard_vocab_limit=False, minloglevel=2,
                num_threads=1)
        except RuntimeError as exc:
            raise UserError(f"tokenizer training failed ({exc}): check that the captions are not empty") \
                from exc
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(model.getvalue())
        os.replace(tmp, out_path)
        return cls(out_path)

    def encode(self, text: str, max_len: int) -> Encoded:
        words = text.split()
        # Each word is encoded on its own (one C++ call for all): pieces never cross whitespace, so
        # this equals whole-text encoding and gives the exact word of every piece.
        return _assemble(self._sp.encode(words) if words else [], self.cls_id, self.sep_id, max_len)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([i for i in ids if i > 4])

    def __getstate__(self):
        return {"path": self.path, "proto": self._sp.serialized_model_proto()}

    def __setstate__(self, state):
        self.__init__(state["path"], model_proto=state["proto"])


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B81F or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _basic_tokens(word: str, lower_case: bool = True) -> list[str]:
    """BERT basic tokenization of one whitespace word: split punctuation/CJK, drop control characters;
    uncased vocabularies also lowercase and strip accents (cased ones, e.g. UNITER's bert-base-cased, not)."""
    if lower_case:
        word = unicodedata.normalize("NFD", word.lower())
    dropped = ("Cc", "Cf", "Mn") if lower_case else ("Cc", "Cf")
    tokens, current = [], []
    for ch in word:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or unicodedata.category(ch) in dropped:
            continue
        if _is_punctuation(ch) or _is_cjk(cp):
            if current:
                tokens.append("".join(current))
                current = []
            tokens.append(ch)
        else:
            current.append(ch)
    if current:
        tokens.append("".join(current))
    return tokens


def _is_cased(pieces) -> bool:
    """A BERT vocabulary is cased when a piece other than the [SPECIAL] ones holds an uppercase letter."""
    return any(any(ch.isupper() for ch in p) for p in pieces if not (p.startswith("[") and p.endswith("]")))


class WordPieceTokenizer:
    """BERT WordPiece from a `vocab.txt` (one piece per line, id = line number). Casing follows the
    vocabulary (uppercase pieces: cased, as bert-base-cased, which UNITER uses) unless ``lower_case`` is
    given."""

    max_chars_per_word = 100

    def __init__(self, vocab_txt: str | os.PathLike, lower_case: bool | None = None):
        path = Path(vocab_txt)
        if not path.is_file():
            raise UserError(f"WordPiece vocabulary {path} not found: pass the checkpoint's BERT vocab.txt")
        lines = path.read_text(encoding="utf-8").splitlines()
        self.vocab = {line.rstrip("\n"): i for i, line in enumerate(lines)}
        missing = [p for p in SPECIAL_PIECES if p not in self.vocab]
        if missing:
            raise UserError(f"WordPiece vocabulary {path} lacks {', '.join(missing)}: use a BERT vocab.txt")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self.vocab[p] for p in SPECIAL_PIECES)
        self.vocab_size = len(self.vocab)
        self.path = path
        self.lower_case = not _is_cased(self.vocab) if lower_case is None else lower_case

    def _wordpieces(self, token: str) -> list[int]:
        if len(token) > self.max_chars_per_word:
            return [self.unk_id]
        pieces, start = [], 0
        while start < len(token):
            end = len(token)
            while end > start:
                piece = token[start:end] if start == 0 else "##" + token[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk_id]
            start = end
        return pieces

    def encode(self, text: str, max_len: int) -> Encoded:
        word_pieces = [[i for tok in _basic_tokens(w, self.lower_case) for i in self._wordpieces(tok)]
                       for w in text.split()]
        return _assemble(word_pieces, self.cls_id, self.sep_id, max_len)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A SentencePiece `.model` or a WordPiece `vocab.txt`, picked by suffix."""
    suffix = Path(path).suffix
    if suffix == ".model":
        return SentencePieceTokenizer(path)
    if suffix == ".txt":
        return WordPieceTokenizer(path)
    raise UserError(f"tokenizer {path}: unknown suffix {suffix!r}; "
                    "use a SentencePiece .model or a BERT vocab.txt")


def iter_captions(sources: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Captions of text files (one per line) and of shard sets (directory, manifest or brace pattern)."""
    from pipeline.data.shards import iter_shard_captions  # lazy: keeps the tokenizer light to import

    for source in sources:
        path = Path(source)
        if path.is_file() and path.suffix in (".txt", ".text"):
            with path.open(encoding="utf-8") as f:
                yield from (line.strip() for line in f if line.strip())
        else:
            yield from iter_shard_captions(str(source))
