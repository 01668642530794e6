"""Load test of an OpenAI-compatible server (this one, or llama-server) on loopback: at each concurrency level,
that many clients each send streamed chat requests from the prompt set back to back; per request the time to the
first content chunk (TTFT) and the gaps between chunks (inter-token latency; a chunk holds one token or a few),
per level the output tokens per second over the level's wall time. Bounded: --requests per level, a timeout per
request. Writes results.json / results.csv (one row per level) in --out-dir.

    python eval/serve_bench.py --url http://127.0.0.1:8000 --concurrency 1,4,8,16 --requests 32 --max-tokens 128"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from common import DEFAULT_PROMPTS, PeakGpu, write_results

FIELDS = ["system", "concurrency", "requests", "failed", "output_tok_s", "ttft_ms_p50", "ttft_ms_p90", "itl_ms_p50",
          "itl_ms_p90", "completion_tokens", "wall_s", "peak_gpu_gib"]


async def one(http: httpx.AsyncClient, url: str, body: dict, timeout: float) -> dict:
    t0, first, times, usage = time.perf_counter(), None, [], None
    async with http.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                first = first or now
                times.append(now)
    if first is None or usage is None:
        return {"error": "no content or no usage in the stream"}
    return {"ttft": first - t0, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": usage["completion_tokens"]}


async def level(url: str, model: str, prompts: list[list[dict]], clients: int, requests: int, a) -> dict:
    queue = list(range(requests))
    results: list[dict] = []

    async def worker(http):
        while queue:
            i = queue.pop(0)
            body = {"model": model, "messages": prompts[i % len(prompts)], "max_tokens": a.max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            try:
                results.append(await one(http, url, body, a.timeout))
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                results.append({"error": f"{type(e).__name__}: {e}"})
    t0 = time.perf_counter()
    # a connection per request: llama-server closes idle kept-alive connections, which a reused one then meets
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)) as http:
        await asyncio.gather(*(worker(http) for _ in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = sorted(1000 * r["ttft"] for r in ok) or [0.0]
    gaps = sorted(1000 * g for r in ok for g in r["gaps"]) or [0.0]
    tokens = sum(r["tokens"] for r in ok)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"system": a.system, "concurrency": clients, "requests": requests, "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3], "output_tok_s": tokens / wall,
            "ttft_ms_p50": statistics.median(ttft), "ttft_ms_p90": pct(ttft, 0.9),
            "itl_ms_p50": statistics.median(gaps), "itl_ms_p90": pct(gaps, 0.9), "completion_tokens": tokens,
            "wall_s": wall}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", help="model id (default: the server's first)")
    ap.add_argument("--system", default="this", help="name of the server in the rows (this, llama-server)")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per request")
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL of {messages: [...]} records")
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args(argv)
    model = a.model or httpx.get(a.url + "/v1/models").json()["data"][0]["id"]
    prompts = [json.loads(line)["messages"] for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    rows = []
    for c in (int(x) for x in a.concurrency.split(",")):
        with PeakGpu() as peak:               # the whole machine's GPU memory: the server's, on a box of its own
            r = asyncio.run(level(a.url, model, prompts, c, max(a.requests, c), a))
        rows.append({**r, "peak_gpu_gib": peak.peak})
        write_results(Path(a.out_dir), rows, FIELDS)      # after each level: a run stopped later keeps these
        print(f"{a.system} c={c:<3} {r['output_tok_s']:8.1f} tok/s  TTFT p50 {r['ttft_ms_p50']:7.0f} ms  "
              f"ITL p50 {r['itl_ms_p50']:6.1f} ms  failed {r['failed']}", flush=True)


if __name__ == "__main__":
    main()
