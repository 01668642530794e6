"""The server's engine and batcher without HTTP: serve.py's setting (its own arguments after `--`), its warm-up, then
at each concurrency level that many clients submitting the prompt set's chat requests back to back straight to the
batcher (greedy, --max-tokens each), as eval/serve_bench.py does over HTTP. Run beside serve_bench on one machine,
it splits the server's inter-token latency between the engine's steps (here) and the HTTP side (the difference):
the fourteenth lease's server stepped 1.4x slower at concurrency 16 than run.py's batch-16 cell. One JSON object.

    python eval/probes/batcher_probe.py --out FILE [--concurrency 4,16] -- --model FILE.gguf --gpu-memory 8GiB"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from eval.common import DEFAULT_PROMPTS, meta  # noqa: E402


def level(batcher, tok, prompts: list[list[dict]], clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` clients, `requests` requests in all, each client's next one submitted as its last one ends."""
    from hybrid.engine.sampling import SamplingParams
    from hybrid.server.sequence import Sequence
    from hybrid.server.text import TextStream
    todo, ended = list(range(requests)), []

    def submit() -> None:
        i = todo.pop(0)
        box = []

        def emit(ev) -> None:
            if ev.finish_reason is not None:
                ended.append(box[0])
                if todo:
                    submit()
        seq = Sequence(tok.chat(prompts[i % len(prompts)]), SamplingParams(max_tokens), TextStream(tok, []), emit,
                       eos=tok.eos_token_id)
        box.append(seq)
        batcher.submit(seq)
    t0 = time.perf_counter()
    for _ in range(min(clients, requests)):
        submit()
    batcher.run(stop=lambda: not todo and len(ended) == requests)
    wall = max(s.token_times[-1] for s in ended) - t0
    ttft = sorted(1000 * (s.token_times[0] - s.submitted) for s in ended)
    gaps = sorted(1000 * (b - a) for s in ended for a, b in zip(s.token_times, s.token_times[1:]))
    tokens = sum(len(s.tokens) for s in ended)
    return {"concurrency": clients, "requests": requests, "output_tok_s": tokens / wall,
            "ttft_ms_p50": statistics.median(ttft), "itl_ms_p50": statistics.median(gaps),
            "itl_ms_p90": gaps[int(0.9 * (len(gaps) - 1))], "completion_tokens": tokens, "wall_s": wall}


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--concurrency", default="4,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args(argv[:cut])
    import serve
    app, batcher, *_ = serve.build(argv[cut + 1:])
    took = batcher.warm_up()
    prompts = [json.loads(line)["messages"] for line in DEFAULT_PROMPTS.read_text().splitlines() if line.strip()]
    rows = []
    for c in (int(x) for x in a.concurrency.split(",")):
        r = level(batcher, app.state.tokenizer, prompts, c, max(a.requests, c), a.max_tokens)
        rows.append(r)
        print(f"batcher c={c:<3} {r['output_tok_s']:8.1f} tok/s  TTFT p50 {r['ttft_ms_p50']:7.0f} ms  "
              f"ITL p50 {r['itl_ms_p50']:6.1f} ms", flush=True)
    Path(a.out).write_text(json.dumps({**meta(), "serve_args": argv[cut + 1:], "warm_up_s": took, "rows": rows},
                                      indent=2))


if __name__ == "__main__":
    main()
