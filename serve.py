"""Serve the model over the OpenAI API (chat and text completions, streamed or not), batching concurrent requests
continuously: sequences join the running batch between decode steps and leave it as they finish.

    python serve.py                                              # small synthetic model, 127.0.0.1:8000
    python serve.py --model DIR_OR.gguf --gpu-memory 8GiB --max-batch-size 16 --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "NAME", "messages": [{"role": "user", "content": "Hello"}]}'
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from hybrid.engine.cli import ArgParser, at_least, check_paths, engine_args, model_and_tokenizer, run_config
from hybrid.engine.engine import Engine
from hybrid.model.config import ConfigError
from hybrid.engine import outside_memory


def parser() -> ArgParser:
    ap = ArgParser(description=__doc__)
    engine_args(ap, "--max-batch-size", 16, "sequences decoded together at most (rows of the running batch)")
    ap.set_defaults(prefill_graph_tokens=0)   # joined prompts' shapes rarely repeat: the graphs' memory goes to experts
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=at_least(1), default=8000, help="TCP port")
    ap.add_argument("--max-waiting", type=at_least(1), default=64,
                    help="requests waiting for a row at most; more are answered 503")
    ap.add_argument("--served-model-name", help="the model's id in the API (default: the checkpoint's name)")
    ap.add_argument("--tokenizer", help="tokenizer folder, or 'bytes' for UTF-8 bytes (default: the checkpoint's)")
    return ap


def build(argv: list[str] | None = None):
    """-> (FastAPI app, batcher, host, port, the setting's key in outside_memory) from the command line; nothing
    served yet. With --gpu-memory on a GPU, the plan reserves what this setting's last warm-up grew outside torch's
    allocator."""
    a = parser().parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        from hybrid.server.api import make_app
        from hybrid.server.batcher import JOIN_TOKENS, Batcher
    except ImportError as e:
        raise ConfigError(f"serve.py needs {e.name}: pip install -r requirements.txt") from None
    check_paths(a, inputs=("model", "costs", "predictors", *(() if a.tokenizer == "bytes" else ("tokenizer",))))
    run = replace(run_config(a), prefill_chunk_tokens=JOIN_TOKENS)   # no prefill is larger: its workspace, no more
    tok = model_and_tokenizer(a, bytes_if_missing=True)
    engine = Engine(a.model, run)
    if engine.outside.reserve:
        print(engine.outside.note(), file=sys.stderr)
    if engine.mode_note:
        print(engine.mode_note, file=sys.stderr)
    name = a.served_model_name or Path(a.model).name
    batcher = Batcher(engine, max_waiting=a.max_waiting)
    return make_app(batcher, tok, name), batcher, a.host, a.port, engine.outside.key


def device_memory(engine, key: str) -> str:
    """After the warm-up: the GPU memory held, torch's and outside its allocator (context, kernel modules, graph
    executables), against the budget, with a warning line where the peak passes it; the growth outside the
    allocator is remembered for the setting (outside_memory), for the next start's plan."""
    import torch

    from hybrid.offload.runtime import outside_allocator_bytes
    GiB = 2**30
    outside = outside_allocator_bytes(engine.device)
    stored = outside_memory.remember(key, outside - engine.context_start)
    peak = torch.cuda.max_memory_reserved() + outside
    line = (f"GPU memory after the warm-up: torch holds {torch.cuda.memory_reserved() / GiB:.2f} GiB (peaked at "
            f"{torch.cuda.max_memory_reserved() / GiB:.2f}), outside its allocator {outside / GiB:.2f} (planned "
            f"{engine.context_bytes / GiB:.2f}): peak {peak / GiB:.2f}")
    budget = engine.run.gpu_memory
    if budget is not None and peak > budget:
        over = peak - budget
        line += (f"\nwarning: the peak passes the {budget / GiB:.2f} GiB budget by {over / GiB:.2f} GiB (memory "
                 f"outside torch's allocator grew past the plan's context); "
                 + ("the next start with these settings reserves it, or " if stored else "")
                 + f"start with --gpu-memory {(budget - over) / GiB:.2f}GiB")
    return line


def main(argv: list[str] | None = None) -> None:
    """HTTP on a thread of its own, the batcher's loop on this one (Batcher says why) until Ctrl-C."""
    import threading
    import time

    import uvicorn
    app, batcher, host, port, key = build(argv)
    took = batcher.warm_up()
    print(f"warmed up in {took:.1f} s (kernels compiled, decode graphs captured)", file=sys.stderr)
    if batcher.engine.device.type == "cuda":
        print(device_memory(batcher.engine, key), file=sys.stderr)
    web = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))

    def listen() -> None:
        try:
            web.run()
        except SystemExit:            # it could not start, and logged why
            pass
    http = threading.Thread(target=listen, name="http", daemon=True)
    http.start()
    while http.is_alive() and not web.started:
        time.sleep(0.05)
    if web.started:
        print(f"serving {app.state.model_name!r} on http://{host}:{port}/v1", file=sys.stderr)
    try:
        batcher.run(stop=lambda: not http.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        web.should_exit = True
        http.join(10)
    if not web.started:
        raise ConfigError(f"could not serve on {host}:{port} (uvicorn's message above says why)")


if __name__ == "__main__":
    from hybrid.engine.errors import friendly
    friendly(main)
