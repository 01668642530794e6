"""Tokenizer loading (transformers, from the checkpoint directory or a GGUF file's metadata), and UTF-8 bytes where
a run asks for them."""
from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
SEARCH = (
    os.environ.get("HYBRID_TOKENIZER", ""),
    str(_REPO / ".tok"),
    str(_REPO.parent / "shared" / "tokenizer" / "deepseek-v2-lite-chat"),
)


def find_tokenizer_dir(model_dir: str | Path | None = None) -> Path | None:
    """The checkpoint's own tokenizer if it has one (a GGUF file's: tokenizer.json beside it), else
    $HYBRID_TOKENIZER, ./.tok, ../shared/tokenizer/..."""
    own = Path(model_dir).parent if model_dir and str(model_dir).endswith(".gguf") else model_dir
    for cand in ([str(own)] if own else []) + list(SEARCH):
        if cand and (Path(cand) / "tokenizer.json").exists():
            return Path(cand)
    return None


class TokenizerError(FileNotFoundError):
    """No tokenizer where one was needed, with where it was looked for."""


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (`--tokenizer bytes`): lets a tokenizer-less synthetic checkpoint run.
    Ids that are no printable byte decode as escapes (\\x07, <id 4321>), never as raw control bytes."""
    bos_token_id, eos_token_id = None, None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        parts, run = [], bytearray()
        for i in [*ids, None]:
            if i is not None and 0 <= i < 256:
                run.append(i)
                continue
            parts.append(run.decode(errors="replace"))
            run = bytearray()
            if i is not None:
                parts.append(f"<id {i}>")
        return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in "".join(parts))

    def chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:")


class HFTokenizer:
    """transformers' tokenizer; plain encoding adds no BOS (the chat template emits it), as the model was trained."""

    def __init__(self, path: Path | None, tok=None):
        try:       # tokenizer.json read directly: the published tokenizer_config names a class it is not
            from transformers import TokenizersBackend as Loader
        except ImportError:
            from transformers import AutoTokenizer as Loader
        self.tok = tok or Loader.from_pretrained(str(path))
        self.bos_token_id, self.eos_token_id = self.tok.bos_token_id, self.tok.eos_token_id

    @classmethod
    def from_gguf(cls, reader) -> "HFTokenizer":
        """The tokenizer and chat template in a GGUF's metadata (gguf_tokenizer.py)."""
        from transformers import PreTrainedTokenizerFast
        from .gguf_tokenizer import build
        try:
            tok, meta = build(reader)
        except ValueError as e:
            raise TokenizerError(str(e)) from None
        return cls(None, PreTrainedTokenizerFast(tokenizer_object=tok, **meta))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict]) -> list[int]:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def load_tokenizer(model_dir: str | Path | None = None, explicit: str | Path | None = None):
    """The tokenizer in `explicit` ("bytes": UTF-8 bytes), else the checkpoint's own (a GGUF's in its metadata),
    else one of SEARCH;
    raises TokenizerError where there is none."""
    if explicit == "bytes":
        return ByteTokenizer()
    if not explicit and str(model_dir).endswith(".gguf") and Path(model_dir).is_file():
        from ..model.gguf_checkpoint import read_gguf
        from .gguf_tokenizer import has_tokenizer
        reader = read_gguf(model_dir)
        if has_tokenizer(reader):
            return HFTokenizer.from_gguf(reader)
    path = Path(explicit) if explicit else find_tokenizer_dir(model_dir)
    if path is None:
        raise TokenizerError(f"no tokenizer.json in {model_dir} (nor in $HYBRID_TOKENIZER, ./.tok or "
                             "../shared/tokenizer): pass --tokenizer DIR, or --tokenizer bytes for UTF-8 bytes")
    if not (path / "tokenizer.json").exists():
        raise TokenizerError(f"no tokenizer.json in {path}")
    return HFTokenizer(path)
