"""Tokenizer loading (transformers, from the checkpoint directory) and a byte fallback for tokenizer-less runs."""
from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
SEARCH = (
    os.environ.get("HYBRID_TOKENIZER", ""),
    str(_REPO / ".tok"),
    str(_REPO.parent / "shared" / "tokenizer" / "deepseek-v2-lite-chat"),
)


def find_tokenizer_dir(model_dir: str | Path | None = None) -> Path | None:
    """The checkpoint's own tokenizer if it has one, else $HYBRID_TOKENIZER, ./.tok, ../shared/tokenizer/..."""
    for cand in ([str(model_dir)] if model_dir else []) + list(SEARCH):
        if cand and (Path(cand) / "tokenizer.json").exists():
            return Path(cand)
    return None


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: lets a tokenizer-less synthetic checkpoint produce some text."""
    bos_token_id, eos_token_id = None, None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i % 256 for i in ids).decode(errors="replace")

    def chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:")


class HFTokenizer:
    """transformers' tokenizer; plain encoding adds no BOS (the chat template emits it), as the model was trained."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.bos_token_id, self.eos_token_id = self.tok.bos_token_id, self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict]) -> list[int]:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def load_tokenizer(model_dir: str | Path | None = None, explicit: str | Path | None = None):
    path = Path(explicit) if explicit else find_tokenizer_dir(model_dir)
    if path is None:
        return ByteTokenizer()
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return HFTokenizer(path)
