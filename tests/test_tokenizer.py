"""GPT-2 byte-level BPE from the packaged files."""

from __future__ import annotations

import numpy as np
import pytest
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gptjax.tokenizer import Tokenizer, default_files, default_tokenizer

TEXTS = ["Hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "naïve café — “quotes”",
         "日本語のテキスト", "emoji 🤖🚀 and ZWJ 👩‍👩‍👧", "numbers 1234567890 3.14159", "<|endoftext|> is text here",
         "", " ", "a" * 300]


def test_known_ids():
    tok = default_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eos_token_id == 50256


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    tok = default_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_agrees_with_tiktoken_from_the_same_files():
    vocab, merges = default_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(merges), encoder_json_file=str(vocab))
    reference = tiktoken.Encoding(
        "gpt2-local", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks, special_tokens={})
    tok = default_tokenizer()
    for text in TEXTS:
        assert tok.encode(text) == reference.encode_ordinary(text), text
    assert tok.encode_batch(TEXTS) == [reference.encode_ordinary(t) for t in TEXTS]


def test_user_files(tmp_path):
    vocab, merges = default_files()
    (tmp_path / "vocab.json").write_bytes(vocab.read_bytes())
    (tmp_path / "merges.txt").write_bytes(merges.read_bytes())
    assert Tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt").encode("Hello world") == [15496, 995]
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing.json", tmp_path / "merges.txt")


def test_decode_skips_ids_outside_the_vocabulary():
    assert default_tokenizer().decode([15496, 50300, 995]) == "Hello world"


def test_decode_is_the_tokenizers_librarys_byte_level_decode():
    """Random ids (most rows cut characters short: U+FFFD where the library puts it), ids past the vocabulary
    (skipped), numpy ids, and the library's decoder over the same files as the reference."""
    from tokenizers import Tokenizer as Library, decoders, models

    vocab, merges = default_files()
    library = Library(models.BPE.from_file(str(vocab), str(merges)))
    library.decoder = decoders.ByteLevel()
    tok = default_tokenizer()
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    rows = [rng.integers(0, tok.vocab_size, n).tolist() for n in rng.integers(0, 40, 200)]
    for row in rows:
        assert tok.decode(row) == library.decode(row, skip_special_tokens=False), row
    assert tok.decode_batch(rows) == library.decode_batch(rows, skip_special_tokens=False)
    row = rows[-1] + [tok.vocab_size, -1, 2**40]
    assert tok.decode(np.array(row[:-1])) == tok.decode(row) == library.decode(rows[-1], skip_special_tokens=False)


def test_decode_batch_is_decode_of_each_row():
    tok = default_tokenizer()
    rows = [tok.encode(t) for t in TEXTS] + [[15496, 50300, 995]]
    assert tok.decode_batch(rows) == [tok.decode(r) for r in rows]


def test_token_bytes_are_tiktokens_and_join_into_the_decoded_text():
    """A token stands for bytes, not text: the halves of an emoji are two tokens of two bytes each, and a text
    is the UTF-8 of its tokens' bytes joined (a character cut short is U+FFFD)."""
    vocab, merges = default_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(merges), encoder_json_file=str(vocab))
    tok = default_tokenizer()
    assert {tok.token_bytes(i): i for i in range(tok.eos_token_id)} == ranks
    assert (tok.token_bytes(tok.eos_token_id), tok.token_bytes(tok.vocab_size), tok.token_bytes(-1)) == (
        b"<|endoftext|>", b"", b"")
    ids = tok.encode("a😀b")
    assert [tok.token_bytes(t) for t in ids] == [b"a", b"\xf0\x9f\x98", b"\x80", b"b"]
    for text in TEXTS:
        ids = tok.encode(text)
        assert b"".join(map(tok.token_bytes, ids)) == text.encode()
        assert tok.decode(ids[:-1]) == b"".join(map(tok.token_bytes, ids[:-1])).decode("utf-8", "replace")


def test_token_bytes_of_a_token_written_outside_the_byte_alphabet_are_its_utf8_as_decode_reads_it(tmp_path):
    import json

    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "中Ġ": 1, "ä": 2, "Ġ": 3}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = Tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert [tok.token_bytes(i) for i in range(4)] == [b"a", "中Ġ".encode(), b"\xe4", b" "]
    for ids in ([0, 1, 3], [2, 0], [1, 2]):
        assert tok.decode(ids) == b"".join(map(tok.token_bytes, ids)).decode("utf-8", "replace")


def test_malformed_or_half_tokenizer_files_are_refused_naming_them(tmp_path):
    """A malformed vocab.json raised the tokenizers library's bare Exception; a checkpoint folder with merges.txt
    but no vocab.json silently ran on GPT-2's tokenizer."""
    from gptjax.tokenizer import folder_tokenizer

    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text('{"a": "not an id"')
    merges.write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match=r"tokenizer files .*vocab.json and .*merges.txt can't be read"):
        Tokenizer(vocab, merges)
    vocab.unlink()
    with pytest.raises(ValueError, match="holds merges.txt but not vocab.json"):
        folder_tokenizer(tmp_path)
    merges.unlink()
    assert folder_tokenizer(tmp_path) is None  # neither: GPT-2's
