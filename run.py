"""Generate text with DeepSeek-V2(-Lite) on one GPU (or the CPU), routed experts offloaded as --mode says.

    python run.py                               # small synthetic model, GPU if there is one
    python run.py --model DIR --mode hybrid --gpu-memory 12GiB --prompt "Hello"
    python run.py --model DIR --chat
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hybrid.cli import engine_args, make_engine, default_model
from hybrid.sampling import SamplingParams
from hybrid.tokenizer import load_tokenizer

DEFAULT_PROMPT = "Explain in two sentences why mixture-of-experts models are hard to fit on one GPU."


def stream_printer(tok, batch: int):
    """For batch 1, prints text as tokens arrive; otherwise prints nothing until the end."""
    seen: list[int] = []
    printed = [0]

    def on_tokens(ids: list[int]) -> None:
        if batch != 1:
            return
        seen.append(ids[0])
        text = tok.decode(seen)
        sys.stdout.write(text[printed[0]:])
        sys.stdout.flush()
        printed[0] = len(text)
    return on_tokens


def one_shot(engine, tok, a, ids: list[int] | None = None) -> None:
    if ids is None:
        ids = tok.encode(a.prompt) if not a.chat_template else tok.chat([{"role": "user", "content": a.prompt}])
    prompts = [ids] * a.batch_size
    params = SamplingParams(a.max_new_tokens, a.temperature, a.top_p, a.seed)
    out = engine.generate(prompts, params, stream_printer(tok, a.batch_size))
    print()
    if a.batch_size > 1:
        for b, toks in enumerate(out.tokens):
            print(f"--- [{b}] {tok.decode(toks)}")
    print(out.stats.line())
    if a.json:
        out.stats.save(a.json, {"command": " ".join(sys.argv), "device": str(engine.device)})


def chat(engine, tok, a) -> None:
    messages: list[dict] = []
    print("chat: empty line or Ctrl-D ends")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        ids = tok.chat(messages)
        params = SamplingParams(a.max_new_tokens, a.temperature, a.top_p, a.seed)
        sys.stdout.write("assistant> ")
        out = engine.generate([ids], params, stream_printer(tok, 1))
        reply = out.tokens[0]
        messages.append({"role": "assistant", "content": tok.decode(reply)})
        print(f"\n{out.stats.line()}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine_args(ap)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--chat", action="store_true", help="interactive chat with the chat template")
    ap.add_argument("--chat-template", action="store_true", help="wrap --prompt in the chat template")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's own)")
    ap.add_argument("--json", help="write the run statistics here")
    ap.add_argument("--record-trace", help="save routing traces (hybrid.trace format) of this run here")
    ap.add_argument("--prompts", help="JSONL prompt file: generate for each record (batch of --batch-size)")
    a = ap.parse_args(argv)
    if a.model is None:
        a.model = str(default_model())
        print("note: no --model given: using a small synthetic checkpoint with random weights; "
              "its output is gibberish by design")
    engine = make_engine(a)
    tok = load_tokenizer(a.model, a.tokenizer)
    recorder = engine.record_trace() if a.record_trace else None
    if a.prompts:
        from hybrid.promptset import encode_record, read_records
        for record in read_records(a.prompts):
            one_shot(engine, tok, a, encode_record(record, tok))
    elif a.chat:
        chat(engine, tok, a)
    else:
        one_shot(engine, tok, a)
    if recorder:
        print(f"trace saved to {recorder.save(a.record_trace)}")


if __name__ == "__main__":
    from hybrid.errors import friendly
    friendly(main)
