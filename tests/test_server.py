"""The OpenAI-compatible server against the official `openai` client and raw HTTP: greedy
results equal the offline engine's, streaming equals non-streaming, n / seeds / stop strings /
logprobs / penalties as offline, hostile input gets the right status and error body while the
server stays up, disconnects abort and free pages, a bounded queue answers 503, /metrics parses
and moves, a 200-request load test loses and duplicates nothing, and SIGTERM ends the process
with exit status 0. Servers bind 127.0.0.1 on a free port, in this process (a thread) or, for
the signal test, in a child process; every wait is bounded."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from conftest import convert_word_llama
from lserve_jax import Engine, SamplingParams
from lserve_jax.server.app import build_app
from lserve_jax.server.metrics import ServerMetrics
from lserve_jax.server.runner import EngineRunner
from models import llama

KEY = "test-key"
ENGINE_ARGS = dict(page_size=8, logical_page_size=4, max_num_seqs=8, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return convert_word_llama(tmp_path_factory)


class Served:
    """A server on 127.0.0.1 in a thread of this process."""

    def __init__(self, engine, **app_kwargs):
        self.metrics = ServerMetrics("tiny")
        self.runner = EngineRunner(engine, on_step=self.metrics.on_step, max_pending=64)
        self.runner.start()
        app = build_app(self.runner, model_name="tiny", metrics=self.metrics, **app_kwargs)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[sock]),
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.runner.stop()

    def idle(self, timeout=30.0) -> bool:
        """Wait until the engine holds no request and every page is free again."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            busy = self.runner.call(lambda e: e.has_unfinished_requests()
                                    or e.pool.num_free != e.pool.num_usable_pages, timeout=30)
            if not busy:
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="module")
def served(ckpt):
    s = Served(Engine(ckpt, **ENGINE_ARGS), api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def offline(ckpt):
    return Engine(ckpt, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, timeout=60, max_retries=0)


def alone(engine, prompt, sp):
    rid = engine.add_request(None, prompt, sp)
    return engine.run_until_done([rid])[rid]


def post(served, path, body=None, *, key=KEY, content=None, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["content-type"] = "application/json"
    return httpx.post(served.url + path, json=body, content=content, headers=headers,
                      timeout=timeout)


GREEDY = dict(temperature=0, max_tokens=12)
PROMPT = "w5 w9 w17 w33 w8 w70 w12"


# ---- the openai client -----------------------------------------------------------------------

def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200


def test_completion_equals_the_offline_engine_streaming_or_not(client, offline):
    want = alone(offline, PROMPT, SamplingParams(**GREEDY))
    got = client.completions.create(model="tiny", prompt=PROMPT, **GREEDY)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == 7 and got.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    ids = client.completions.create(model="tiny", prompt=[5, 9, 17], **GREEDY)
    assert ids.choices[0].text == alone(offline, [5, 9, 17], SamplingParams(**GREEDY)).text
    two = client.completions.create(model="tiny", prompt=[PROMPT, "w1 w2"], echo=True, **GREEDY)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == PROMPT + want.text


def test_chat_equals_the_offline_engine_streaming_or_not(client, offline):
    messages = [{"role": "system", "content": "w10"}, {"role": "user", "content": "w11 w12"},
                {"role": "assistant", "content": "w13"}, {"role": "user", "content": "w14"}]
    prompt = offline.render_chat(messages)
    want = alone(offline, prompt, SamplingParams(**GREEDY))
    got = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    limited = client.chat.completions.create(model="tiny", messages=messages,
                                             max_completion_tokens=3, temperature=0)
    assert limited.usage.completion_tokens == 3


def test_n_samples_with_a_seed_are_reproducible(client):
    kwargs = dict(model="tiny", prompt=PROMPT, n=3, seed=5, temperature=1.0, max_tokens=10)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3
    streamed = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == texts


def test_stop_strings_cut_exactly(client, offline):
    full = alone(offline, PROMPT, SamplingParams(temperature=0, max_tokens=20)).text
    words = full.split(" ")
    stop = words[5][1:] + " " + words[6][:2]
    got = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=20,
                                    stop=[stop, "qqq"])
    assert got.choices[0].text == full[:full.find(stop)]
    assert got.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt=PROMPT, temperature=0,
                                       max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == full[:full.find(stop)]


def test_logprobs_match_a_log_softmax_of_the_models_logits(client, offline):
    got = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                  "content": "w20 w21"}],
                                         logprobs=True, top_logprobs=3, **GREEDY)
    prompt = offline.render_chat([{"role": "user", "content": "w20 w21"}])
    ids = offline.tokenizer.encode(prompt)
    out_ids = alone(offline, prompt, SamplingParams(**GREEDY)).token_ids
    logits = llama.forward(offline.params, jnp.asarray([ids + out_ids]), config=offline.config)[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(ids) - 1:-1]
    content = got.choices[0].logprobs.content
    assert len(content) == 12
    for j, (token_id, entry) in enumerate(zip(out_ids, content)):
        assert entry.token == offline.tokenizer.decode([token_id])
        assert abs(entry.logprob - logp[j, token_id]) < 1e-4
        top = np.argsort(-logp[j])[:3]
        assert [t.token for t in entry.top_logprobs] == [offline.tokenizer.decode([int(t)])
                                                         for t in top]
        assert all(abs(t.logprob - logp[j, i]) < 1e-4 for t, i in zip(entry.top_logprobs, top))
    legacy = client.completions.create(model="tiny", prompt=PROMPT, logprobs=2, **GREEDY)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == 12 and len(lp.top_logprobs[0]) == 2
    assert lp.text_offset[1] == len(lp.tokens[0])


def test_penalties_equal_the_offline_engine(client, offline):
    knobs = dict(presence_penalty=1.2, frequency_penalty=0.5)
    got = client.completions.create(model="tiny", prompt=PROMPT, **GREEDY, **knobs,
                                    extra_body={"repetition_penalty": 1.3})
    want = alone(offline, PROMPT, SamplingParams(**GREEDY, **knobs, repetition_penalty=1.3))
    assert got.choices[0].text == want.text
    assert want.text != alone(offline, PROMPT, SamplingParams(**GREEDY)).text


# ---- bad and hostile input ---------------------------------------------------------------------

BAD = [
    (b"{not json", 400, None),
    (json.dumps({"prompt": "w5", "max_tokens": "many"}), 400, "max_tokens"),
    (json.dumps({"prompt": "w5", "max_tokens": -3}), 400, "max_tokens"),
    (json.dumps({"prompt": "w5", "max_tokens": 10**12}), 400, "max_tokens"),
    (json.dumps({"prompt": "w5", "n": 0}), 400, "n"),
    (json.dumps({"prompt": "w5", "temperature": -1}), 400, "temperature"),
    (json.dumps({"prompt": "w5", "top_p": 0}), 400, "top_p"),
    (json.dumps({"prompt": "w5", "stop": [""]}), 400, "stop"),
    (json.dumps({"prompt": [5, 900]}), 400, "prompt"),
    (json.dumps({"prompt": "w5 " * 300}), 400, "max_tokens"),
    (json.dumps({"prompt": [[5] * 300], "max_tokens": None}), 400, "prompt"),
    (json.dumps({"prompt": []}), 400, "prompt"),
    (json.dumps({"prompt": "w5", "model": "gpt-4"}), 404, "model"),
    (json.dumps([1, 2]), 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=range(len(BAD)))
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(served, body, status, param):
    r = post(served, "/v1/completions", content=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param
    ok = post(served, "/v1/completions", {"prompt": "w5 w6", "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_chat_errors(served):
    assert post(served, "/v1/chat/completions", {"messages": []}).status_code == 400
    r = post(served, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    r = post(served, "/v1/chat/completions",
             {"messages": [{"role": "user", "content": "w5"}], "top_logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_body_size_and_api_key(served):
    huge = b'{"prompt": "' + b"w5 " * (10 * 2**20 // 3) + b'"}'
    assert post(served, "/v1/completions", content=huge).status_code == 413
    for key in (None, "wrong", KEY + "x"):
        r = post(served, "/v1/completions", {"prompt": "w5"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(served.url + "/v1/models", timeout=10).status_code == 401
    assert post(served, "/v1/completions", {"prompt": "w5", "max_tokens": 2}).status_code == 200


@contextlib.contextmanager
def paused(runner):
    """Hold the engine thread (it runs a call that waits) until the block ends."""
    entered, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=runner.call, daemon=True,
                              args=(lambda e: (entered.set(), release.wait(60)),))
    thread.start()
    assert entered.wait(60)
    try:
        yield
    finally:
        release.set()
        thread.join(60)


def aborts(served) -> float:
    try:
        return metric(served, "lserve_request_success_total", finished_reason="abort")
    except KeyError:
        return 0.0


def wait_for(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


@contextlib.contextmanager
def held_after_a_step(runner):
    """Hold the engine thread right after the next step that produced outputs (delivered
    first), until the block ends; yields the event set once it is held."""
    held, release = threading.Event(), threading.Event()
    original = runner.on_step

    def hook(engine, outputs):
        original(engine, outputs)
        if outputs and not release.is_set():
            held.set()
            release.wait(60)

    runner.on_step = hook
    try:
        yield held
    finally:
        runner.on_step = original
        release.set()


def test_a_disconnect_mid_stream_aborts_and_frees_pages(served):
    before = aborts(served)
    body = {"prompt": PROMPT, "max_tokens": 240, "stream": True, "ignore_eos": True}
    with held_after_a_step(served.runner) as held:  # the request cannot finish meanwhile
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", served.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert next(r.iter_lines()).startswith("data: ")
                assert held.wait(60)
        wait_for(lambda: served.runner._commands.qsize() > 0)  # the server's abort
    assert served.idle(), "the aborted request kept its pages"
    assert aborts(served) == before + 1


def test_a_client_that_stops_waiting_aborts_its_request(served):
    before = aborts(served)
    with paused(served.runner):
        with pytest.raises(httpx.TimeoutException):
            post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 240,
                                             "ignore_eos": True}, timeout=0.5)
    wait_for(lambda: aborts(served) == before + 1)
    assert served.idle()


def test_a_full_queue_answers_503(served):
    runner = served.runner
    runner.max_pending = 1
    try:
        with paused(runner):
            first = {}
            thread = threading.Thread(target=lambda: first.update(r=post(
                served, "/v1/completions", {"prompt": "w5", "max_tokens": 2})))
            thread.start()
            wait_for(lambda: runner.num_pending == 1)
            busy = post(served, "/v1/completions", {"prompt": "w6", "max_tokens": 2})
            assert busy.status_code == 503 and busy.json()["error"]["type"] == "server_error"
        thread.join(60)
        assert first["r"].status_code == 200
    finally:
        runner.max_pending = 64
    assert served.idle()
    assert post(served, "/v1/completions", {"prompt": "w5", "max_tokens": 2}).status_code == 200


def metric(served, name, **labels):
    for family in text_string_to_metric_families(httpx.get(served.url + "/metrics",
                                                           timeout=10).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def test_metrics_parse_and_move(served):
    before = {n: metric(served, n) for n in ("lserve_prompt_tokens_total",
                                             "lserve_generation_tokens_total",
                                             "lserve_time_to_first_token_seconds_count")}
    r = post(served, "/v1/completions", {"prompt": "w5 w6 w7", "max_tokens": 4,
                                         "ignore_eos": True})
    assert r.status_code == 200
    assert metric(served, "lserve_prompt_tokens_total") == before["lserve_prompt_tokens_total"] + 3
    assert (metric(served, "lserve_generation_tokens_total")
            == before["lserve_generation_tokens_total"] + 4)
    assert (metric(served, "lserve_time_to_first_token_seconds_count")
            == before["lserve_time_to_first_token_seconds_count"] + 1)
    assert metric(served, "lserve_kv_pages_free") > 0
    assert metric(served, "lserve_num_requests_running") == 0


FIELDS = {
    "prompt": st.one_of(st.text(max_size=20), st.lists(st.integers(-5, 200), max_size=6),
                        st.integers(), st.none()),
    "max_tokens": st.one_of(st.integers(-3, 6), st.floats(allow_nan=True), st.text(max_size=3),
                            st.none()),
    "temperature": st.one_of(st.floats(-2, 3), st.just(float("nan")), st.text(max_size=3)),
    "top_p": st.one_of(st.floats(-1, 2), st.integers(-1, 2)),
    "top_k": st.one_of(st.integers(-3, 200), st.floats()),
    "n": st.one_of(st.integers(-1, 3), st.text(max_size=2)),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=3), max_size=3),
                      st.integers()),
    "logprobs": st.one_of(st.integers(-2, 8), st.booleans(), st.none()),
    "seed": st.one_of(st.integers(-5, 2**64), st.none()),
    "stream": st.booleans(),
    "presence_penalty": st.floats(-3, 3),
    "echo": st.one_of(st.booleans(), st.integers()),
    "whatever": st.text(max_size=5),
}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_fuzzed_request_bodies_never_break_the_server(served, body):
    r = post(served, "/v1/completions", content=json.dumps(body))  # NaN and inf as Python writes them
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["message"]
    elif not body.get("stream"):
        assert r.json()["choices"]


# ---- load -------------------------------------------------------------------------------------

def test_200_streaming_requests_from_32_clients(served, offline):
    rng = np.random.default_rng(0)
    jobs = [(" ".join(f"w{t}" for t in rng.integers(3, 120, int(rng.integers(2, 40)))),
             int(rng.integers(1, 24))) for _ in range(200)]

    async def one(client, prompt, n):
        text, finish = "", None
        async with client.stream("POST", "/v1/completions", json={
                "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                "ignore_eos": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["text"]
                finish = chunk["choices"][0]["finish_reason"] or finish
        return text, finish

    async def main():
        todo = asyncio.Queue()
        for i, job in enumerate(jobs):
            todo.put_nowait((i, job))
        results = {}

        async def worker(client):
            while not todo.empty():
                i, (prompt, n) = todo.get_nowait()
                assert i not in results
                results[i] = await one(client, prompt, n)

        async with httpx.AsyncClient(base_url=served.url, timeout=120,
                                     headers={"Authorization": f"Bearer {KEY}"}) as client:
            await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(32))), 600)
        return results

    results = asyncio.run(main())
    assert sorted(results) == list(range(200))
    ids = [offline.add_request(None, p, SamplingParams(max_tokens=n, temperature=0,
                                                       ignore_eos=True)) for p, n in jobs]
    want = offline.run_until_done(ids)
    for i, rid in enumerate(ids):
        assert results[i] == (want[rid].text, "length"), i
    assert served.idle()


# ---- the process --------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [[], ["--tensor-parallel-size", "2"]], ids=["tp1", "tp2"])
def test_serve_process_answers_and_exits_0_on_sigterm(ckpt, tmp_path, flags):
    """The server process (at TP=2 on two host devices it makes itself) answers with the
    offline engine's greedy tokens, and SIGTERM ends it with status 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lserve_jax.serve", "--ckpt", str(ckpt), "--port", str(port),
         "--page-size", "8", "--logical-page-size", "4", "--max-num-seqs", "4",
         "--served-model-name", "tiny", *flags],
        cwd=Path(__file__).parent.parent, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        out = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=3,
                                        temperature=0)
        assert out.usage.completion_tokens == 3
        engine = Engine(str(ckpt), page_size=8, logical_page_size=4, max_num_seqs=4)
        engine.add_request("r", "w5 w6", SamplingParams(max_tokens=3, temperature=0))
        assert out.choices[0].text == engine.run_until_done()["r"].outputs[0].text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read()
        assert "ready" in log and "stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
