"""Build a real CLIP BPE tokenizer offline from OpenAI's `bpe_simple_vocab_16e6.txt.gz`."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from noclone.errors import NocloneError

CLIP_VOCAB_SIZE = 49408
_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def find_bpe_vocab() -> Path:
    """Locate the CLIP BPE file shipped by `open_clip_torch` or `openai-clip`."""
    for module, sub in (("open_clip", ""), ("clip", "")):
        spec = importlib.util.find_spec(module)
        if spec and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                candidate = Path(root) / sub / _BPE_NAME
                if candidate.is_file():
                    return candidate
    raise NocloneError(
        f"{_BPE_NAME} not found: install `open_clip_torch` with --no-deps (or `openai-clip`), or pass its path"
    )


def write_clip_tokenizer_files(out_dir: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write vocab.json + merges.txt + tokenizer_config.json for CLIPTokenizer.from_pretrained(out_dir)."""
    bpe_path = Path(bpe_path) if bpe_path else find_bpe_vocab()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise NocloneError(f"{bpe_path}: built {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def load_clip_tokenizer(path: str | Path):
    """Load a CLIPTokenizer from a local folder and check it is the full vocabulary (not the 3-token trap)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    if len(tokenizer) < 1000:
        raise NocloneError(f"{path}: tokenizer has only {len(tokenizer)} tokens; expected the CLIP vocabulary")
    return tokenizer
