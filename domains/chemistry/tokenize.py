"""Molecule tokenizers: atom-level SMILES (the standard regular expression) and SELFIES.

Both tokenise a SMILES string (SELFIES first encodes it with the ``selfies`` package), map tokens
to ids over a vocabulary built from the training molecules with five special tokens
(``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<mask>`` 3, ``<unk>`` 4), and decode ids back to a
SMILES string. Tokenising is lossless: joining the tokens gives the input string back (tested).

The SMILES regular expression is the one of Schwaller et al. (2019, Molecular Transformer),
used by most SMILES language models: bracket atoms stay whole, ``Br``/``Cl`` are one token, ring
closures ``%nn`` are one token.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from sciscope.core.errors import ConfigError

__all__ = ["SPECIAL_TOKENS", "MoleculeTokenizer", "SMILES_REGEX", "smiles_tokens", "selfies_tokens", "TOKENIZER_FILE"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>", "<unk>")
PAD, BOS, EOS, MASK, UNK = range(5)
ENCODINGS = ("smiles", "selfies")
#: File name of a saved :class:`MoleculeTokenizer` inside a model directory.
TOKENIZER_FILE = "sciscope_tokenizer.json"

SMILES_REGEX = re.compile(
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>|\*|\$|%[0-9]{2}|[0-9])"
)


def smiles_tokens(smiles: str) -> list[str]:
    """Atom-level SMILES tokens; a :class:`ValueError` (not a skip, so tokens always join back) when a character
    is not covered."""
    tokens = SMILES_REGEX.findall(smiles)
    if "".join(tokens) != smiles:
        covered = set("".join(tokens))
        bad = sorted({ch for ch in smiles if ch not in covered}) or ["?"]
        raise ValueError(f"SMILES {smiles!r} has characters the atom-level tokenizer does not cover: {bad}")
    return tokens


def selfies_tokens(smiles: str) -> list[str]:
    """SELFIES tokens (``[C]``, ``[=O]``, ``[Branch1]`` ...) of a SMILES string."""
    import selfies as sf

    try:
        enc = sf.encoder(smiles)
    except Exception as e:  # selfies raises EncoderError on unsupported SMILES
        raise ValueError(f"SELFIES cannot encode {smiles!r}: {e}") from None
    if enc is None:
        raise ValueError(f"SELFIES cannot encode {smiles!r}")
    return list(sf.split_selfies(enc))


class MoleculeTokenizer:
    """A SMILES or SELFIES tokenizer with a fixed vocabulary.

    Parameters
    ----------
    encoding
        ``"smiles"`` or ``"selfies"``.
    vocab
        Every token, specials first (as :data:`SPECIAL_TOKENS`).
    max_length
        Longest id sequence (with ``<bos>``/``<eos>``) the model accepts; longer ones are cut.

    Examples
    --------
    >>> tok = MoleculeTokenizer.build("selfies", ["CCO", "c1ccccc1O"])
    >>> tok.decode(tok.encode("CCO"))
    'CCO'
    """

    def __init__(self, encoding: str, vocab: Sequence[str], max_length: int = 128) -> None:
        if encoding not in ENCODINGS:
            raise ConfigError(f"chemistry: encoding must be one of {ENCODINGS}, got {encoding!r}")
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with the special tokens {SPECIAL_TOKENS}")
        self.encoding = encoding
        self.vocab = list(vocab)
        self.index = {t: i for i, t in enumerate(self.vocab)}
        self.max_length = int(max_length)
        self.pad_token_id, self.bos_token_id, self.eos_token_id = PAD, BOS, EOS
        self.mask_token_id, self.unk_token_id = MASK, UNK

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def build(cls, encoding: str, smiles: Iterable[str], *, max_length: int = 128, min_count: int = 1) -> "MoleculeTokenizer":
        """Vocabulary of every token seen at least ``min_count`` times in ``smiles`` (sorted)."""
        counts: Counter[str] = Counter()
        for s in smiles:
            try:
                counts.update(cls._split(encoding, s))
            except ValueError:
                continue  # untokenisable molecules are left out of the vocabulary, not fatal
        tokens = sorted(t for t, c in counts.items() if c >= min_count and t not in SPECIAL_TOKENS)
        return cls(encoding, [*SPECIAL_TOKENS, *tokens], max_length=max_length)

    @staticmethod
    def _split(encoding: str, smiles: str) -> list[str]:
        return smiles_tokens(smiles) if encoding == "smiles" else selfies_tokens(smiles)

    # -- text <-> tokens <-> ids ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, smiles: str) -> list[int]:
        """Ids of ``smiles`` (``<bos> ... <eos>``, cut to ``max_length``); unknown tokens become ``<unk>``."""
        ids = [BOS, *(self.index.get(t, UNK) for t in self._split(self.encoding, smiles)), EOS]
        return ids if len(ids) <= self.max_length else ids[: self.max_length - 1] + [EOS]

    def decode(self, ids: Iterable[int]) -> str:
        """SMILES of ``ids`` up to the first ``<eos>``: tokens joined (SMILES), or joined and decoded by ``selfies``.

        Special tokens are skipped. SELFIES decoding always yields a molecule string (possibly ``""``
        for an empty or degenerate sequence); SMILES decoding returns the joined string, valid or not.
        """
        ids = [int(i) for i in ids]
        ids = ids[: ids.index(EOS)] if EOS in ids else ids
        text = "".join(self.vocab[i] if i < len(self.vocab) else "" for i in ids if i >= len(SPECIAL_TOKENS))
        if self.encoding == "smiles":
            return text
        import selfies as sf

        try:
            return sf.decoder(text) or ""
        except Exception:
            return ""

    @property
    def non_atom_ids(self) -> list[int]:
        """Ids of tokens that are not atoms (bonds, branches, ring closures, SELFIES Branch/Ring).

        A molecule cannot start with one: generation masks them at the first position, so a
        sampled sequence never decodes to an empty string for lack of a first atom.
        """
        tokens = list(enumerate(self.vocab))[len(SPECIAL_TOKENS):]
        if self.encoding == "selfies":
            return [i for i, t in tokens if "Branch" in t or "Ring" in t or t == "[nop]"]
        return [i for i, t in tokens if not (t.startswith("[") or t[0].isalpha() or t == "*")]

    def __call__(self, smiles: Sequence[str], *, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` for a batch of SMILES."""
        return pad_batch([self.encode(s)[: max_length or self.max_length] for s in smiles])

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``sciscope_tokenizer.json`` into ``directory``."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": "sciscope.MoleculeTokenizer", "encoding": self.encoding,
                                    "max_length": self.max_length, "vocab": self.vocab}, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "MoleculeTokenizer":
        path = Path(directory)
        d = json.loads((path / TOKENIZER_FILE if path.is_dir() else path).read_text())
        return cls(d["encoding"], d["vocab"], max_length=d.get("max_length", 128))

    def __repr__(self) -> str:
        return f"MoleculeTokenizer({self.encoding!r}, {self.vocab_size} tokens, max_length={self.max_length})"


def pad_batch(seqs: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Right-pad id lists into ``input_ids`` / ``attention_mask`` long tensors."""
    n = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}
