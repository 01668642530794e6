"""Prompt sets as JSONL: one record per line, either {"messages": [{"role": ..., "content": ...}, ...]} (encoded
with the chat template) or {"text": ...} / {"prompt": ...} (plain encoding, no BOS)."""
from __future__ import annotations

import json
from pathlib import Path

from ..model.config import ConfigError


def read_records(path: str | Path) -> list[dict]:
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {n} is not JSON: {e}") from None
        if not isinstance(record, dict) or not ({"messages", "text", "prompt"} & set(record)):
            raise ConfigError(f"{path} line {n}: each record needs 'messages', 'text' or 'prompt'")
        records.append(record)
    if not records:
        raise ConfigError(f"no prompts in {path}")
    return records


def encode_record(record: dict, tok) -> list[int]:
    if "messages" in record:
        return tok.chat(record["messages"])
    return tok.encode(record.get("text") or record["prompt"])


def prompt_ids(path: str | Path, tok, length: int, count: int) -> list[list[int]]:
    """`count` prompts of exactly `length` tokens: a short record is continued with the next ones, a long one cut."""
    encoded = [encode_record(r, tok) for r in read_records(path)]
    out = []
    for i in range(count):
        ids, k = [], i
        while len(ids) < length:
            ids += encoded[k % len(encoded)]
            k += 1
        out.append(ids[:length])
    return out
