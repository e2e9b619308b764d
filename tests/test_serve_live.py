"""``omnikv serve`` end to end: the real Scheduler over the bundled model behind a live uvicorn server
on a free loopback port, driven by the official ``openai`` client.

Prompts are short and answers 10 tokens or fewer (a 2-core CI box runs the suite); everything is
greedy (temperature 0), so a request's text does not depend on what else is in the batch.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from serve_testlib import live_server, parse_exposition  # noqa: E402

import omnikv_runtime as okv  # noqa: E402
from omnikv_runtime.engine.patches import detach_model  # noqa: E402
from omnikv_runtime.serve.app import create_app  # noqa: E402
from omnikv_runtime.serve.scheduler import Scheduler  # noqa: E402

MODEL = "smollm2-135m"
NEW = 10
CONTEXT = 192  # the slots' columns (a decode step costs all of them): the model's 8192 would take gigabytes
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "A haiku about the sea:",
    "The first man on the moon was",
    "My favourite fruit is",
]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # goes on for a long time: the disconnect test's stream


@pytest.fixture(scope="module")
def engine(bundled_session):
    model, tokenizer = bundled_session
    base = model.config._attn_implementation
    engine = okv.initialize(model, "configs/default.json", tokenizer=tokenizer)
    yield engine
    detach_model(model, base)


@pytest.fixture(scope="module")
def reference(engine) -> str:
    """What ``engine.generate`` answers PROMPTS[0] (greedy), before the server shares the engine."""
    ids = engine.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    out = engine.generate(ids, max_new_tokens=NEW)
    return engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def server(engine, reference):
    scheduler = Scheduler(engine, max_batch=8, max_queue=64, max_context=CONTEXT)
    with live_server(create_app(scheduler, MODEL), grace=5) as (_, url):
        yield scheduler, url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0, timeout=120)


def _complete(client, prompt: str, stream: bool) -> tuple[str, str, object]:
    """(text, finish_reason, usage) of a greedy completion, whole or streamed."""
    if not stream:
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW, temperature=0)
        return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW, temperature=0, stream=True))
    text = "".join(chunk.choices[0].text for chunk in chunks)
    return text, chunks[-1].choices[0].finish_reason, chunks[-1].usage


def _chat(client, content: str, stream: bool) -> tuple[str, str, object]:
    messages = [{"role": "user", "content": content}]
    if not stream:
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW, temperature=0)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_completion_tokens=NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and all(chunk.usage is None for chunk in chunks[:-1])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    return text, chunks[-2].choices[0].finish_reason, chunks[-1].usage


def _check_usage(usage, prompt_tokens: int, finish_reason: str) -> None:
    assert usage.prompt_tokens == prompt_tokens
    assert 1 <= usage.completion_tokens <= NEW
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (usage.completion_tokens == NEW) == (finish_reason == "length"), (usage, finish_reason)


def test_completion_whole_and_streamed(client, engine, reference):
    text, reason, usage = _complete(client, PROMPTS[0], stream=False)
    assert text == reference  # the engine's own greedy answer
    prompt_tokens = len(engine.tokenizer(PROMPTS[0])["input_ids"])
    _check_usage(usage, prompt_tokens, reason)
    assert _complete(client, PROMPTS[0], stream=True) == (text, reason, usage)


def test_chat_whole_and_streamed(client, engine):
    text, reason, usage = _chat(client, "What is the capital of France?", stream=False)
    assert text.strip()
    template = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    _check_usage(usage, len(engine.tokenizer(template, add_special_tokens=False)["input_ids"]), reason)
    assert _chat(client, "What is the capital of France?", stream=True) == (text, reason, usage)


def test_eight_concurrent_clients_each_get_their_text_alone(client, server):
    scheduler = server[0]
    jobs = [(_chat if index % 2 else _complete, prompt, index % 4 < 2) for index, prompt in enumerate(PROMPTS)]
    alone = [call(client, prompt, stream)[0] for call, prompt, stream in jobs]

    widest, done = 0, threading.Event()

    def watch() -> None:
        nonlocal widest
        while not done.is_set():
            widest = max(widest, scheduler.metrics()["batch_size"])
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = threading.Barrier(len(jobs))

    def run(job):
        call, prompt, stream = job
        start.wait()
        return call(client, prompt, stream)[0]

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(run, jobs))
    finally:
        done.set()
        watcher.join()
    assert together == alone
    assert widest > 1, "the requests never shared a decode step"


def test_a_client_that_leaves_mid_stream_frees_its_slot_and_host_rows(client, server):
    scheduler = server[0]
    before = scheduler.metrics()
    limit = 120
    stream = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=limit, temperature=0, stream=True)
    received = []
    for chunk in stream:
        received.append(chunk.choices[0].text)
        if len(received) == 3:
            break
    during = scheduler.metrics()
    assert during["slots_free"] == before["slots_free"] - 1
    assert during["kv_bytes"]["host_used"] > before["kv_bytes"]["host_used"]
    stream.close()  # the connection goes; the server must notice and cancel

    deadline = time.monotonic() + 60
    after = scheduler.metrics()
    while after["requests_running"] or after["slots_free"] != before["slots_free"]:
        assert time.monotonic() < deadline, f"the request still holds its slot: {after}"
        time.sleep(0.05)
        after = scheduler.metrics()
    assert after["kv_bytes"]["host_used"] == before["kv_bytes"]["host_used"]
    generated = after["generation_tokens_total"] - before["generation_tokens_total"]
    assert generated < limit, "the request ran to max_tokens: it was not cancelled"
    assert _complete(client, PROMPTS[0], stream=False)[0]  # and the server goes on serving


def test_over_the_context_limit_and_metrics(client, server):
    scheduler, url = server
    assert scheduler.context_limit == CONTEXT
    for prompt, max_tokens in (("Hello " * 30, CONTEXT - 20), ("Hello " * 100, CONTEXT - 50)):  # admission, prefix
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)
        assert refused.value.code == "context_length_exceeded"
        assert refused.value.body["param"] == "prompt"
        assert f"over this server's context of {CONTEXT} tokens" in refused.value.message
    samples = parse_exposition(httpx.get(f"{url}/metrics").text)
    metrics = scheduler.metrics()
    assert samples["omnikv_requests_rejected_total"] >= 1
    assert samples["omnikv_slots_free"] == metrics["slots_free"] == 8
    assert samples["omnikv_generation_tokens_total"] >= NEW
    for tier in ("gpu_dense", "gpu_selected", "gpu_tail", "host_used", "host_allocated"):
        assert f'omnikv_kv_bytes{{tier="{tier}"}}' in samples
    assert samples['omnikv_http_responses_total{code="400"}'] >= 2


def test_a_tiny_temperature_answers_as_greedy(client, reference):
    """Sampling at 1e-38 divided the logits into infinities: NaN probabilities, token 0, an empty text."""
    for temperature in (1e-38, 5e-324):
        reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=NEW, temperature=temperature)
        assert reply.choices[0].text == reference


def test_a_length_cut_inside_a_character_leaves_no_replacement_character(client, engine):
    """Greedy, the second token of this prompt's answer ends inside a character: at max_tokens 2 it is cut."""
    prompt, tokenizer = "中国的首都是", engine.tokenizer
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    tokens = engine.generate(ids, max_new_tokens=3)[0, ids.shape[1] :].tolist()
    cut, whole_characters = tokenizer.decode(tokens[:2]), tokenizer.decode(tokens)
    assert cut.endswith("\ufffd") and "\ufffd" not in cut[:-1] + whole_characters
    for max_tokens, text in ((2, cut[:-1]), (3, whole_characters)):
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        stream = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        assert whole.choices[0].finish_reason == "length"
        assert whole.choices[0].text == "".join(chunk.choices[0].text for chunk in stream) == text


def test_a_lone_surrogate_is_a_400_naming_the_field(server):
    """The tokenizer raised TypeError on it (a 500); a chat message's content too."""
    url = server[1]
    raw = {"/v1/completions": '{"prompt": "ab\\ud800cd", "max_tokens": 1}'}
    raw["/v1/chat/completions"] = '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}'
    for path, body in raw.items():
        response = httpx.post(url + path, content=body.encode(), headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_value" and error["param"] in ("prompt", "messages[0].content")
        assert "lone surrogate (\\ud800 at character" in error["message"]
