"""The OpenAI-compatible server (serve.py) on the tiny model, driven by the official openai client: models, chat
and completions, streaming, concurrent clients against the same requests one by one, a client that goes away,
bad requests, a full waiting room; and the continuous-batching rows (engine/slots.py) against generation alone."""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

from conftest import budget_for, make
from hybrid.engine.sampling import SamplingParams
from hybrid.engine.slots import Slots
from hybrid.engine.tokenizer import ByteTokenizer
from hybrid.server.batcher import Overloaded
from hybrid.server.sequence import Sequence
from hybrid.server.text import TextStream


@pytest.fixture(scope="module")
def server(tiny):
    import uvicorn
    import serve
    app, batcher, *_ = serve.build(["--model", str(tiny), "--device", "cpu", "--dtype", "float32", "--tokenizer",
                                    "bytes", "--max-batch-size", "16", "--max-seq-len", "160", "--mode", "gpu"])
    batcher.warm_up()                             # as serve.py's main does before it listens
    batcher.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app.state.model_name, batcher
    srv.should_exit = True
    thread.join(10)
    batcher.close()


@contextmanager
def step_sizes(batcher, joins: list | None = None):
    """The number of rows of every decode step the batcher runs meanwhile (and of every join, into `joins`)."""
    sizes, step, join = [], batcher.slots.step, batcher.slots.join
    batcher.slots.step = lambda tokens: sizes.append(len(tokens)) or step(tokens)
    if joins is not None:
        batcher.slots.join = lambda prompts, news: joins.append(len(prompts)) or join(prompts, news)
    try:
        yield sizes
    finally:
        batcher.slots.step, batcher.slots.join = step, join


def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def test_models_chat_completion_and_streaming(server):
    c, name = client(server), server[1]
    assert [m.id for m in c.models.list()] == [name]
    chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                     temperature=0)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 6
    assert chat.usage.prompt_tokens == len(ByteTokenizer().chat([{"role": "user", "content": "hi"}]))
    text = c.completions.create(model=name, prompt="abc", max_tokens=5, temperature=0)
    assert text.usage.prompt_tokens == 3 and text.choices[0].text
    chunks = list(c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 6
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    streamed = c.completions.create(model=name, prompt="abc", max_tokens=5, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == text.choices[0].text
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    parts = c.chat.completions.create(model=name, messages=[{"role": "user", "content": [
        {"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}], max_tokens=6, temperature=0)
    assert parts.choices[0].message.content == chat.choices[0].message.content      # text parts joined


def test_sampled_requests_follow_their_seed(server):
    c, name = client(server), server[1]
    ask = lambda seed: c.completions.create(model=name, prompt="roll", max_tokens=8, temperature=1.0,  # noqa: E731
                                            seed=seed).choices[0].text
    assert ask(7) == ask(7) and len({ask(s) for s in range(4)}) > 1


@pytest.mark.parametrize("clients", [8, 16])
def test_concurrent_clients_get_what_each_request_gets_alone(server, clients):
    c, name, batcher = client(server), server[1], server[2]
    asks = [(f"prompt {i} " + "x" * (i % 5), 4 + (i * 3) % 9) for i in range(3 * clients)]

    def ask(a):
        r = c.completions.create(model=name, prompt=a[0], max_tokens=a[1], temperature=0)
        return r.choices[0].text, r.usage.completion_tokens
    alone = [ask(a) for a in asks]
    joins = []
    with step_sizes(batcher, joins) as sizes, ThreadPoolExecutor(clients) as ex:
        together = list(ex.map(ask, asks))
    assert together == alone
    assert max(sizes) >= clients // 2                   # the requests really ran side by side
    assert sum(joins) == len(asks) and max(joins) > 1   # and some joined in one prefill


def test_a_client_that_goes_away_mid_stream_frees_its_row(server):
    url, name, batcher = server
    body = {"model": name, "prompt": "a long answer", "max_tokens": 120, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(200):
        if batcher.running == 0:
            break
        time.sleep(0.05)
    assert batcher.running == 0
    assert 'hybrid_requests_total{finish_reason="cancelled"}' in httpx.get(url + "/metrics").text
    ok = client(server).completions.create(model=name, prompt="still here", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens == 3


@pytest.mark.parametrize("change, param", [
    ({"model": "other"}, "model"), ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"), ({"max_tokens": 150}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role")])
def test_bad_requests_are_openai_errors_with_status_400(server, change, param):
    url, name, _ = server
    body = {"model": name, "messages": [{"role": "user", "content": "x" * 20}], **change}
    r = httpx.post(url + "/v1/chat/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == param, err
    assert httpx.get(url + "/health").status_code == 200


def test_a_request_that_ends_at_its_first_token_takes_no_step(server):
    c, name, batcher = client(server), server[1], server[2]
    with step_sizes(batcher) as sizes:
        r = c.completions.create(model=name, prompt="one", max_tokens=1, temperature=0)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length" and sizes == []


def test_an_empty_prompt_is_a_400(server):
    r = httpx.post(server[0] + "/v1/completions", json={"model": server[1], "prompt": ""})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the prompt is empty"


def test_a_full_waiting_room_answers_503(server):
    url, name, batcher = server
    limit, batcher.max_waiting = batcher.max_waiting, 0
    try:
        r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
    finally:
        batcher.max_waiting = limit
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"


def test_prometheus_metrics_count_requests_tokens_and_latency(server):
    client(server).completions.create(model=server[1], prompt="count me", max_tokens=4, temperature=0)
    text = httpx.get(server[0] + "/metrics").text
    for name in ("hybrid_requests_total", "hybrid_prompt_tokens_total", "hybrid_generation_tokens_total",
                 "hybrid_time_to_first_token_seconds_bucket", "hybrid_inter_token_latency_seconds_count",
                 "hybrid_running_sequences", "hybrid_waiting_sequences", "hybrid_expert_hit_rate",
                 "hybrid_pcie_bytes_total", "hybrid_cpu_share"):
        assert name in text, name
    generated = float(next(l for l in text.splitlines() if l.startswith("hybrid_generation_tokens_total")).split()[1])
    assert generated >= 4


def test_stop_strings_end_the_text_and_unfinished_characters_are_held():
    s = TextStream(ByteTokenizer(), ["END"])
    out = [s.add(b) for b in "ok E".encode()]
    assert "".join(d for d, _ in out) == "ok " and not any(stop for _, stop in out)   # "E" may start "END"
    assert s.add(ord("N")) == ("", False) and s.add(ord("D")) == ("", True) and s.text == "ok "
    s = TextStream(ByteTokenizer(), ["END"])
    text = "".join(s.add(b)[0] for b in "abENDzz".encode())
    assert text == "ab" and s.flush() == ""
    s = TextStream(ByteTokenizer(), [])
    e_acute = "é".encode()
    assert s.add(e_acute[0]) == ("", False) and s.add(e_acute[1]) == ("é", False)
    s = TextStream(ByteTokenizer(), ["é", "🙂!"])                  # stops that end or start in a split character
    assert [s.add(b) for b in "aé".encode()] == [("a", False), ("", False), ("", True)] and s.text == "a"
    s = TextStream(ByteTokenizer(), ["🙂!"])
    text = "".join(s.add(b)[0] for b in "x🙂y🙂!z".encode())
    assert text == "x🙂y" and s.text == "x🙂y"


def test_overloaded_when_the_waiting_room_is_full(tiny):
    from hybrid.server.batcher import Batcher
    b = Batcher(make(tiny, max_batch_size=1), max_waiting=1).start()
    try:
        tok = ByteTokenizer()
        long = Sequence([1, 2, 3], SamplingParams(120, stop_on_eos=False), TextStream(tok, []), lambda ev: None)
        b.submit(long)
        while b.running == 0:                         # the long one holds the only row
            time.sleep(0.01)
        b.submit(Sequence([4], SamplingParams(2), TextStream(tok, []), lambda ev: None))
        with pytest.raises(Overloaded):
            b.submit(Sequence([5], SamplingParams(2), TextStream(tok, []), lambda ev: None))
        long.cancelled.set()
    finally:
        b.close()


def test_a_burst_of_requests_joins_in_one_prefill(tiny, monkeypatch):
    from hybrid.server.batcher import JOIN_QUIET_S, Batcher
    joins, join = [], Slots.join
    monkeypatch.setattr(Slots, "join", lambda self, ps, news: joins.append(len(ps)) or join(self, ps, news))
    b = Batcher(make(tiny, max_batch_size=8)).start()
    try:
        tok, seqs = ByteTokenizer(), []
        for i in range(6):                       # arrivals a few ms apart, as HTTP requests of one burst come
            seqs.append(Sequence([5 + i, 6, 7], SamplingParams(3, stop_on_eos=False), TextStream(tok, []),
                                 lambda ev: None))
            b.submit(seqs[-1])
            time.sleep(JOIN_QUIET_S / 4)
        while not all(q.done for q in seqs):
            time.sleep(0.01)
    finally:
        b.close()
    assert joins == [6]


def test_the_warm_up_runs_every_batch_size_then_leaves_the_rows_free_and_the_results_unchanged(tiny):
    from hybrid.server.batcher import Batcher
    prompts, params = [[5, 6, 7], [42] * 9], SamplingParams(6, stop_on_eos=False)
    run = dict(max_batch_size=4, max_seq_len=64, mode="hybrid", gpu_memory=budget_for(tiny, 6, batch=4, seq=64))
    want = [make(tiny, **run).generate([p], params).tokens[0] for p in prompts]
    b = Batcher(make(tiny, **run))
    joins = []
    with step_sizes(b, joins) as sizes:
        assert b.warm_up(prompt_tokens=20) > 0
    assert joins == [4, 1] and sizes == [4, 3, 2, 1, 1]          # a step at every batch size, and one alone
    assert b.slots.n == 0 and not b.waiting and not any(b.metrics.totals.values())
    assert b"hybrid_generation_tokens_total 0.0" in b.metrics.render()
    b.start()
    try:
        tok = ByteTokenizer()
        seqs = [Sequence(p, params, TextStream(tok, []), lambda ev: None) for p in prompts]
        for q in seqs:
            b.submit(q)
        while not all(q.done for q in seqs):
            time.sleep(0.01)
    finally:
        b.close()
    assert [q.tokens for q in seqs] == want


def test_waiting_requests_join_once_their_burst_is_over_or_they_fill_the_rows(tiny):
    from hybrid.server.batcher import JOIN_QUIET_S, JOIN_WAIT_S, Batcher
    b = Batcher(make(tiny, max_batch_size=3))
    tok = ByteTokenizer()
    assert b.join_delay(0.0) == float("inf")
    seqs = [Sequence([1], SamplingParams(2), TextStream(tok, []), lambda ev: None) for _ in range(3)]
    for i, q in enumerate(seqs):
        q.submitted = 100.0 + i * JOIN_QUIET_S / 2
    b.waiting.extend(seqs[:2])
    newest = seqs[1].submitted
    assert b.join_delay(newest) == pytest.approx(JOIN_QUIET_S)              # the burst may go on
    assert b.join_delay(newest + JOIN_QUIET_S) <= 0                         # quiet: join
    b.waiting[1].submitted = 100.0 + JOIN_WAIT_S                            # arrivals that never pause
    assert b.join_delay(100.0 + JOIN_WAIT_S) <= 0                           # the oldest has waited long enough
    b.waiting.append(seqs[2])
    assert b.join_delay(0.0) == 0.0                                         # they fill the free rows


def test_rows_joining_and_leaving_compute_what_each_sequence_computes_alone(tiny):
    from eval.probes.batch_sizes_check import batched         # the same loop runs on the GPU box, with graphs
    e = make(tiny, max_batch_size=4, max_seq_len=40)
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300], list(range(1, 25)), [42], [7] * 12, [3, 1, 4, 1, 5]]
    new = [10, 12, 6, 15, 8, 9]
    alone = [e.generate([p], SamplingParams(n, stop_on_eos=False)).tokens[0] for p, n in zip(prompts, new)]
    shifts = []
    e.cache.shift = (lambda f: lambda rows, by, length: shifts.append(by) or f(rows, by, length))(e.cache.shift)
    out, sizes, joins = batched(e, prompts, new, per_join=lambda step: 2 if step % 4 == 0 else 1)
    assert out == alone
    assert any(b > 0 for b in shifts) and any(b < 0 for b in shifts)     # made room both ways
    assert 2 in joins and set(sizes) == {1, 2, 3, 4}


def test_load_test_script_measures_each_concurrency_level(server, tmp_path):
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "eval"))
    import serve_bench
    import plots
    serve_bench.main(["--url", server[0], "--concurrency", "1,3", "--requests", "3", "--max-tokens", "5",
                      "--out-dir", str(tmp_path / "this")])
    rows = json.loads((tmp_path / "this" / "results.json").read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 3] and all(r["failed"] == 0 for r in rows)
    assert all(r["completion_tokens"] == 15 and r["output_tok_s"] > 0 and r["ttft_ms_p50"] > 0 for r in rows)
    plots.main(["serve", str(tmp_path)])
    assert (tmp_path / "serve.png").stat().st_size > 10_000


def test_load_test_keeps_the_levels_measured_before_it_is_stopped(tmp_path, monkeypatch):
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "eval"))
    import serve_bench

    async def level(url, model, prompts, clients, requests, a):
        if clients > 1:
            raise KeyboardInterrupt          # as a timeout's signal would stop it during the second level
        return {"system": a.system, "concurrency": clients, "requests": requests, "failed": 0, "output_tok_s": 1.0,
                "ttft_ms_p50": 1.0, "itl_ms_p50": 1.0}
    monkeypatch.setattr(serve_bench, "level", level)
    with pytest.raises(KeyboardInterrupt):
        serve_bench.main(["--model", "m", "--concurrency", "1,4", "--out-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1]


def test_serve_names_the_address_it_cannot_listen_on(tiny):
    import serve
    from hybrid.model.config import ConfigError
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"could not serve on 127.0.0.1:{port}"):
            serve.main(["--model", str(tiny), "--device", "cpu", "--dtype", "float32", "--tokenizer", "bytes",
                        "--max-seq-len", "64", "--port", str(port)])


def test_the_server_plans_memory_for_its_own_prefills(server):
    """serve.py sizes the prefill workspace to one join and captures no prefill graphs: at 8 GiB on V2-Lite with
    q4k experts that leaves the expert cache more slots than the engine's defaults would."""
    import torch
    from dataclasses import replace
    from hybrid.model.config import ModelConfig
    from hybrid.model.synthetic import PRESETS
    from hybrid.offload.runtime import memory_plan
    from hybrid.server.batcher import JOIN_TOKENS
    run = server[2].engine.run
    assert run.prefill_chunk_tokens == JOIN_TOKENS and run.prefill_graph_tokens == 0
    cfg = ModelConfig.from_dict(PRESETS["v2-lite"][0])
    ours = replace(run, mode="hybrid", experts="q4k", gpu_memory=8 * 2**30, max_seq_len=1024, dtype="bfloat16")
    defaults = replace(ours, prefill_chunk_tokens=4096, prefill_graph_tokens=512)
    slots = [memory_plan(cfg, r, torch.device("cuda"), 2, 0).n_slots for r in (ours, defaults)]   # no CUDA call
    assert slots[0] > slots[1] * 1.1


def test_text_streams_decode_a_few_tokens_each_and_give_the_whole_decode(tokenizer_dir):
    """Incremental text equals decoding all tokens at once (real tokenizer: multi-byte characters split over tokens,
    spaces joined on), and no decode call covers more than a handful of tokens."""
    from hybrid.engine.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    ids = tok.encode("Grüße aus 北京! Ça va? 🙂🙂 — done.  Two  spaces.") * 3
    longest = []
    decode = tok.decode
    tok.decode = lambda t: (longest.append(len(t)), decode(t))[1]
    s = TextStream(tok, [])
    text = "".join(s.add(t)[0] for t in ids) + s.flush()
    tok.decode = decode
    assert text == decode(ids) and max(longest) <= 8


def test_the_memory_line_after_the_warm_up_warns_and_remembers_the_growth_outside_the_allocator(tmp_path,
                                                                                               monkeypatch):
    """serve.py's line after the warm-up: the peak is torch's peak plus what lies outside its allocator now (kernel
    modules and graph executables grow it past the context measured at start); past --gpu-memory it adds a warning
    line. Either way the growth is stored for the setting, and the next start's plan reserves it."""
    import types

    import torch

    import serve
    from hybrid.offload import runtime
    from hybrid.engine import outside_memory
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path))
    GiB = 2**30
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: int(7.0 * GiB))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: int(7.25 * GiB))
    engine = types.SimpleNamespace(device=torch.device("cuda"), context_bytes=GiB // 2, context_start=GiB // 2,
                                   run=types.SimpleNamespace(gpu_memory=8 * GiB))
    for outside, over in ((GiB // 2, False), (GiB, True)):
        monkeypatch.setattr(runtime, "outside_allocator_bytes", lambda device, b=outside: b)
        line = serve.device_memory(engine, "setting")
        assert f"peak {7.25 + outside / GiB:.2f}" in line and ("warning:" in line) == over
        assert outside_memory.reserved("setting") == outside - GiB // 2
    assert "by 0.25 GiB" in line and "--gpu-memory 7.75GiB" in line and "next start" in line
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path / outside_memory.FILE / "under a file"))   # cannot be written
    line = serve.device_memory(engine, "setting")
    assert "warning:" in line and "next start" not in line


def test_a_start_reserves_what_its_settings_last_warm_up_grew_outside_the_allocator(tiny, tmp_path, monkeypatch):
    """The key leaves the budget out (a smaller --gpu-memory captures the same graphs) and keeps what shapes the
    graphs; the stored growth becomes part of the plan's context only with a budget, and the cache is smaller by it."""
    import serve
    from hybrid.engine import outside_memory
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path))
    assert outside_memory.reserved("anything") == 0
    (tmp_path / outside_memory.FILE).write_text("not json")
    assert outside_memory.reserved("anything") == 0
    base = ["--model", str(tiny), "--device", "cpu", "--dtype", "float32", "--tokenizer", "bytes",
            "--max-seq-len", "64", "--mode", "hybrid"]
    args = base + ["--max-batch-size", "2"]
    budget = budget_for(tiny, 20, batch=2, seq=64)
    _, batcher, *_, key = serve.build(args + ["--gpu-memory", str(budget)])
    slots = batcher.engine.backend.cache.n_slots
    *_, key_smaller = serve.build(args + ["--gpu-memory", str(budget - 1000)])
    *_, key_wider = serve.build(base + ["--max-batch-size", "3", "--gpu-memory", str(budget_for(tiny, 20, batch=3,
                                                                                               seq=64))])
    assert key == key_smaller != key_wider
    from hybrid.model.quant import expert_bytes
    slot = expert_bytes(batcher.engine.cfg, "bf16", 4)                   # float32 experts
    outside_memory.remember(key, 3 * slot)
    _, again, *_ = serve.build(args + ["--gpu-memory", str(budget)])
    assert again.engine.context_bytes == 3 * slot and again.engine.backend.cache.n_slots == slots - 3
    _, unbounded, *_ = serve.build(args)
    assert unbounded.engine.context_bytes == 0


def test_a_first_start_on_a_gpu_reserves_an_estimate_until_its_setting_is_measured(tmp_path, monkeypatch):
    """Nothing stored: a GPU start reserves the modules and every batch size's graphs (more for more batch sizes), a
    CPU start nothing; once a warm-up has stored the setting's growth, that figure, measured, on either."""
    from types import SimpleNamespace
    from hybrid.engine import outside_memory as om
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path))
    small, large = SimpleNamespace(max_batch_size=4, mode="auto"), SimpleNamespace(max_batch_size=16, mode="hybrid")
    first, measured = om.reserve("k", large, gpu=True)
    assert not measured and first == om.first_start(large) > om.first_start(small) > om.MODULES_BYTES
    resident = SimpleNamespace(max_batch_size=16, mode="gpu")              # a whole step is one graph
    assert om.MODULES_BYTES < om.first_start(resident) < om.first_start(small)
    assert om.reserve("k", large, gpu=False) == (0, True)
    om.remember("k", 12345)
    assert om.reserve("k", large, gpu=True) == om.reserve("k", large, gpu=False) == (12345, True)
    om.remember("k", 100)                        # a run that grew less (shorter prompts) keeps the largest
    assert om.reserved("k") == 12345
    om.remember("k", 20000)
    assert om.reserved("k") == 20000


def test_every_engine_with_a_budget_reserves_what_its_setting_grew_before(tiny, tmp_path, monkeypatch):
    """Not only the server: run.py's and the sweep's engines plan with the setting's stored growth outside the
    allocator (the fifteenth lease's 6 and 4 GiB cells, which reserved nothing, peaked 0.07 / 0.06 GiB over), and
    say so; without a budget, or with a reserve asked for, nothing stored applies."""
    from hybrid.engine import outside_memory as om
    from hybrid.engine.engine import Engine
    from hybrid.model.config import RunConfig
    from hybrid.model.quant import expert_bytes
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path))
    budget = budget_for(tiny, 20)
    first = make(tiny, mode="hybrid", gpu_memory=budget)
    assert first.outside.reserve == 0 and first.outside.note() == ""
    slot = expert_bytes(first.cfg, "bf16", 4)
    om.remember(first.outside.key, 2 * slot)
    again = make(tiny, mode="hybrid", gpu_memory=budget)
    assert again.outside == om.Outside(first.outside.key, 2 * slot, True)
    assert again.backend.cache.n_slots == first.backend.cache.n_slots - 2 and "MiB" in again.outside.note()
    assert make(tiny, mode="hybrid").outside.reserve == 0
    run = RunConfig(dtype="float32", max_batch_size=3, max_seq_len=128, mode="hybrid", gpu_memory=budget)
    asked = Engine(str(tiny), run, progress=False, reserve=0)
    assert asked.outside.reserve == 0 and asked.backend.cache.n_slots == first.backend.cache.n_slots


def test_the_batcher_probe_runs_the_servers_engine_without_http(tiny):
    """eval/probes/batcher_probe.py: clients submit straight to the batcher, each client's next request as its last
    one ends, until every request has run; the level's figures come from the sequences' own token times."""
    import sys
    import serve
    from conftest import ROOT
    sys.path.insert(0, str(ROOT))
    from eval.probes.batcher_probe import level
    app, batcher, *_ = serve.build(["--model", str(tiny), "--device", "cpu", "--dtype", "float32", "--tokenizer",
                                    "bytes", "--max-batch-size", "4", "--max-seq-len", "400", "--mode", "gpu"])
    prompts = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "a longer question"}]]
    with step_sizes(batcher) as sizes:
        r = level(batcher, app.state.tokenizer, prompts, clients=3, requests=5, max_tokens=4)
    assert r["requests"] == 5 and r["completion_tokens"] == 20 and max(sizes) == 3
    assert r["output_tok_s"] > 0 and 0 < r["itl_ms_p50"] <= r["itl_ms_p90"] and r["ttft_ms_p50"] > 0
    assert batcher.running == 0 and not batcher.waiting
