"""SentencePiece and WordPiece tokenizers: special ids, word indices, truncation, loading."""
from __future__ import annotations

import json
import pickle

import pytest
import webdataset as wds

from pipeline.errors import UserError
from pipeline.data.tokenizer import (SentencePieceTokenizer, WordPieceTokenizer, iter_captions, load_tokenizer)

CAPTIONS = [f"a {size} {colour} {shape} {rel} a {colour2} {shape2}"
            for size in ("small", "large") for colour in ("red", "blue", "green")
            for shape in ("circle", "square") for rel in ("left of", "above")
            for colour2, shape2 in (("yellow", "star"), ("purple", "cross"))]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "sp.model"
    return SentencePieceTokenizer.train(CAPTIONS, path, vocab_size=60)


def test_special_ids_and_vocab(sp):
    assert (sp.pad_id, sp.unk_id, sp.cls_id, sp.sep_id, sp.mask_id) == (0, 1, 2, 3, 4)
    assert 20 < sp.vocab_size <= 60
    enc = sp.encode("a small red circle", 32)
    assert enc.ids[0] == 2 and enc.ids[-1] == 3
    assert all(i > 4 for i in enc.ids[1:-1])          # specials never come out of text
    assert sp.encode("[MASK] [CLS]", 16).ids.count(4) == 0


def test_word_index_follows_whitespace_words(sp):
    text = "a  small red   circle above a purple cross"
    enc = sp.encode(text, 64)
    assert enc.word_index[0] == -1 and enc.word_index[-1] == -1
    inner = enc.word_index[1:-1]
    assert inner == sorted(inner) and set(inner) == set(range(len(text.split())))
    # each word's tokens are exactly that word's own encoding
    for w, word in enumerate(text.split()):
        ids = [i for i, wi in zip(enc.ids, enc.word_index) if wi == w]
        assert ids == sp.encode(word, 64).ids[1:-1]
    assert sp.decode(enc.ids) == " ".join(text.split())


def test_truncation(sp):
    full = sp.encode(CAPTIONS[0], 64)
    for max_len in (2, 3, 5, len(full.ids) - 1, len(full.ids), 100):
        enc = sp.encode(CAPTIONS[0], max_len)
        assert len(enc.ids) == min(max_len, len(full.ids)) == len(enc.word_index)
        assert enc.ids[0] == 2 and enc.ids[-1] == 3
        assert enc.ids[1:-1] == full.ids[1:len(enc.ids) - 1]
    assert sp.encode("", 8).ids == [2, 3]
    with pytest.raises(UserError):
        sp.encode("a", 1)


def test_save_load_pickle(sp, tmp_path):
    again = load_tokenizer(sp.path)
    assert isinstance(again, SentencePieceTokenizer)
    assert again.encode(CAPTIONS[3], 20) == sp.encode(CAPTIONS[3], 20)
    clone = pickle.loads(pickle.dumps(sp))        # DataLoader workers get a copy
    assert clone.encode(CAPTIONS[5], 20) == sp.encode(CAPTIONS[5], 20)
    with pytest.raises(UserError):
        SentencePieceTokenizer(tmp_path / "missing.model")
    with pytest.raises(UserError):
        load_tokenizer(tmp_path / "x.bin")


def test_iter_captions_from_text_file_and_shards(tmp_path):
    (tmp_path / "caps.txt").write_text("one caption\n\n second caption \n", encoding="utf-8")
    split = tmp_path / "split"
    split.mkdir()
    with wds.TarWriter(str(split / "00000.tar")) as w:
        w.write({"__key__": "k0", "txt": "first",
                 "json": json.dumps({"captions": ["first", "again"]}).encode()})
        w.write({"__key__": "k1", "txt": "only txt"})
        w.write({"__key__": "k2", "txt": "x",
                 "json": json.dumps({"caption": "img2dataset caption"}).encode()})
    got = list(iter_captions([tmp_path / "caps.txt", split]))
    assert got == ["one caption", "second caption", "first", "again", "only txt", "img2dataset caption"]
    texts = iter_captions([split, tmp_path / "caps.txt"])
    tok = SentencePieceTokenizer.train(texts, tmp_path / "t.model", 40)
    assert tok.cls_id == 2


@pytest.fixture()
def vocab(tmp_path):
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "left", "of", "un", "##aff",
              "##able", ",", "!", "cafe", "the", "##s"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(pieces) + "\n", encoding="utf-8")
    return path, {p: i for i, p in enumerate(pieces)}


def test_wordpiece(vocab):
    path, ids = vocab
    tok = load_tokenizer(path)
    assert isinstance(tok, WordPieceTokenizer)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    enc = tok.encode("A RED circles, unaffable Café! xyz", 64)
    expect = ["[CLS]", "a", "red", "circle", "##s", ",", "un", "##aff", "##able", "cafe", "!", "[UNK]",
              "[SEP]"]
    assert enc.ids == [ids[p] for p in expect]
    assert enc.word_index == [-1, 0, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, -1]
    short = tok.encode("A RED circles, unaffable", 5)
    assert short.ids == [ids["[CLS]"], ids["a"], ids["red"], ids["circle"], ids["[SEP]"]]


def test_wordpiece_cased_vocab_keeps_case_and_accents(tmp_path):
    """UNITER is bert-base-cased: capitalised words and accents must map to their own cased pieces."""
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "A", "a", "Red", "red", "Café", "cafe", "!"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(pieces) + "\n", encoding="utf-8")
    ids = {p: i for i, p in enumerate(pieces)}
    tok = load_tokenizer(path)
    assert not tok.lower_case
    enc = tok.encode("A red Red Café!", 16)
    assert enc.ids == [ids[p] for p in ["[CLS]", "A", "red", "Red", "Café", "!", "[SEP]"]]
    forced = WordPieceTokenizer(path, lower_case=True)
    assert forced.encode("A Red Café", 16).ids == [ids[p] for p in ["[CLS]", "a", "red", "cafe", "[SEP]"]]


def test_wordpiece_missing_specials(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(UserError, match="CLS"):
        WordPieceTokenizer(path)


def test_regular_captions_tokenize_to_whole_words(tmp_path):
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star"]
    relations = ["to the left of", "to the right of", "above", "below"]
    captions = [f"a picture of a {size} {c1} {s1} {rel} a {c2} {s2}"
                for size in ("small", "large") for c1 in colours for s1 in shapes for rel in relations
                for c2 in colours[:3] for s2 in shapes[:2]]
    sp = SentencePieceTokenizer.train(captions, tmp_path / "regular.model", vocab_size=200)
    text = "a picture of a small purple star to the right of a blue circle"
    enc = sp.encode(text, max_len=64)
    assert len(enc.ids) == len(text.split()) + 2  # every word one piece, plus [CLS] and [SEP]
