"""Generate text with DeepSeek-V2(-Lite) on one GPU (or the CPU), routed experts offloaded as --mode says.

    python run.py                               # small synthetic model, GPU if there is one
    python run.py --model DIR --prompt "Hello"  # mode auto: all resident if it fits, else hybrid
    python run.py --model DIR --mode hybrid --gpu-memory 12GiB --prompt "Hello"
    python run.py --model DIR --chat
"""
from __future__ import annotations

import select
import signal
import sys
import threading

from hybrid.engine.cli import ArgParser, at_least, check_paths, engine_args, model_and_tokenizer, run_config
from hybrid.engine.engine import Engine
from hybrid.engine.promptset import encode_record, read_records
from hybrid.engine.sampling import SamplingParams

DEFAULT_PROMPT = "Explain in two sentences why mixture-of-experts models are hard to fit on one GPU."


def stream_printer(tok, batch: int, stop: threading.Event | None = None):
    """For batch 1, prints text as tokens arrive; otherwise prints nothing until the end. Returns False (ends the
    generation) once `stop` is set."""
    seen: list[int] = []
    printed = [0]

    def on_tokens(ids: list[int]) -> bool:
        if batch == 1:
            seen.append(ids[0])
            text = tok.decode(seen)
            sys.stdout.write(text[printed[0]:])
            sys.stdout.flush()
            printed[0] = len(text)
        return stop is None or not stop.is_set()
    return on_tokens


def one_shot(engine, tok, a, params: SamplingParams, ids: list[int] | None = None) -> None:
    if ids is None:
        ids = tok.encode(a.prompt) if not a.chat_template else tok.chat([{"role": "user", "content": a.prompt}])
    out = engine.generate([ids] * a.batch_size, params, stream_printer(tok, a.batch_size))
    print()
    if a.batch_size > 1:
        for b, toks in enumerate(out.tokens):
            print(f"--- [{b}] {tok.decode(toks)}")
    print(out.stats.line())
    if a.json:
        out.stats.save(a.json, {"command": " ".join(sys.argv), "device": str(engine.device)})


def fit_context(engine, tok, messages: list[dict], new_tokens: int) -> list[int] | None:
    """The conversation's ids, dropping the oldest turns while prompt + new tokens outgrow the context (saying so);
    None if the last message alone does not fit (it is dropped too)."""
    room = engine.context_len - new_tokens
    ids = tok.chat(messages)
    while len(ids) > room and len(messages) > 1:
        del messages[:2 if len(messages) > 2 else 1]
        print(f"(context of {engine.context_len} tokens full: dropped the oldest turn)")
        ids = tok.chat(messages)
    if len(ids) > room:
        print(f"error: that message is {len(ids)} tokens; with {new_tokens} new tokens the context holds {room}")
        messages.clear()
        return None
    return ids


def read_line(prompt: str) -> str:
    """input() that Ctrl-C always interrupts: SIGINT may land on a torch worker thread, which leaves a blocking
    read in the main thread asleep; waiting in short select() rounds lets the main thread see it."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    while not select.select([sys.stdin], [], [], 0.1)[0]:
        pass
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def chat(engine, tok, params: SamplingParams) -> None:
    """Turns from stdin until an empty line, EOF or Ctrl-C at the prompt. Ctrl-C during a reply ends the reply."""
    messages: list[dict] = []
    print("chat: empty line, Ctrl-D or Ctrl-C at the prompt ends; Ctrl-C during a reply stops it")
    while True:
        try:
            line = read_line("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()                                  # the shell's prompt starts on a line of its own
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        ids = fit_context(engine, tok, messages, params.max_new_tokens)
        if ids is None:
            continue
        stop = threading.Event()

        def interrupt(*_) -> None:                   # the first Ctrl-C ends the reply, a second one the chat
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()
        previous = signal.signal(signal.SIGINT, interrupt)
        sys.stdout.write("assistant> ")
        try:
            out = engine.generate([ids], params, stream_printer(tok, 1, stop))
        finally:
            signal.signal(signal.SIGINT, previous)
        messages.append({"role": "assistant", "content": tok.decode(out.tokens[0])})
        print(f"\n{'(stopped) ' if stop.is_set() else ''}{out.stats.line()}")


def parser() -> ArgParser:
    ap = ArgParser(description=__doc__)
    engine_args(ap)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue (or to answer, with --chat-template)")
    ap.add_argument("--chat", action="store_true", help="interactive chat with the chat template")
    ap.add_argument("--chat-template", action="store_true", help="wrap --prompt in the chat template")
    ap.add_argument("--max-new-tokens", type=at_least(1), default=64, help="tokens to generate per prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--tokenizer", help="tokenizer directory, or 'bytes' for UTF-8 bytes (default: the "
                                        "checkpoint's own)")
    ap.add_argument("--json", help="write the run statistics here (default: not saved)")
    ap.add_argument("--record-trace", help="save routing traces (hybrid.offload.trace format) of this run here "
                                           "(default: not recorded)")
    ap.add_argument("--prompts", help="JSONL prompt file: generate for each record, in batches of --batch-size "
                                      "(default: --prompt)")
    return ap


def args(argv: list[str] | None):
    a = parser().parse_args(argv)
    tokenizer = () if a.tokenizer == "bytes" else ("tokenizer",)
    check_paths(a, inputs=("model", "costs", "prompts", "predictors", *tokenizer), outputs=("json", "record_trace"))
    return a


def main(argv: list[str] | None = None) -> None:
    a = args(argv)
    run = run_config(a)                                                             # both checked before loading
    params = SamplingParams(a.max_new_tokens, a.temperature, a.top_p, a.seed)
    tok = model_and_tokenizer(a)
    records = read_records(a.prompts) if a.prompts else []
    engine = Engine(a.model, run)
    if engine.mode_note:
        print(engine.mode_note, file=sys.stderr)
    recorder = engine.record_trace() if a.record_trace else None
    if records:
        for record in records:
            one_shot(engine, tok, a, params, encode_record(record, tok))
    elif a.chat:
        chat(engine, tok, params)
    else:
        one_shot(engine, tok, a, params)
    if recorder:
        print(f"trace saved to {recorder.save(a.record_trace)}")


if __name__ == "__main__":
    from hybrid.engine.errors import friendly
    friendly(main)
