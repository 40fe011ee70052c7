"""The CLIP BPE tokenizer, built offline from the vocabulary the open_clip_torch wheel ships.

The files written here (``vocab.json``, ``merges.txt``) have the layout of the OpenAI CLIP
tokenizer on the hub (49408 tokens: 256 byte symbols, the same 256 ending a word with
``</w>``, 48894 merges, then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407), so a
prompt tokenizes to the same ids as it would for real Stable Diffusion.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from engine.errors import FairsynthError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2


def _bpe_file() -> Path:
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - open_clip_torch is a dependency
        raise FairsynthError(
            "open_clip_torch is not installed; the offline CLIP tokenizer is built from the "
            "vocabulary file it ships (pip install open_clip_torch)"
        ) from exc
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FairsynthError(
            f"CLIP BPE vocabulary not found at {path}; expected the file open_clip_torch ships"
        )
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of GPT-2 and CLIP byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id) and its merges, in rank order."""
    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]  # line 0 is a version header
    if len(merges) != _N_MERGES:
        raise FairsynthError(
            f"CLIP BPE vocabulary {_bpe_file()} has {len(merges)} merges; expected {_N_MERGES}"
        )
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise FairsynthError(f"built a CLIP vocabulary of {len(vocab)} tokens; expected {VOCAB_SIZE}")
    return vocab, merges


def write_clip_vocab_files(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder`` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    return folder


def build_clip_tokenizer():
    """A transformers ``CLIPTokenizer`` equal to the one real Stable Diffusion uses, offline."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        model_max_length=MODEL_MAX_LENGTH,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
