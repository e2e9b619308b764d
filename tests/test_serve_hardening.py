"""``omnikv serve`` against hostile clients, over the fake scheduler of tests/serve_testlib.py: bad input that
must be a 400 with a code (never a 500), tokenizing kept off the event loop and refused early, the API key as
bytes, the context's floor. The servers are live (uvicorn on a loopback port, built as ``omnikv serve`` builds
them), or Starlette's test client where no socket matters.
"""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from serve_testlib import CharTokenizer, FakeScheduler, live_server, refusal  # noqa: E402

from omnikv_runtime import cli  # noqa: E402
from omnikv_runtime.errors import ConfigError  # noqa: E402
from omnikv_runtime.serve.app import create_app  # noqa: E402
from omnikv_runtime.serve.guard import api_key_bytes  # noqa: E402

MODEL = "fake-model"
PROMPT = {"prompt": "hello", "max_tokens": 3}
JSON = {"content-type": "application/json"}


# bad client input is a 400 with a code, naming the field -----------------------------------------------
HOSTILE = [
    pytest.param(
        "/v1/completions",
        b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        ("max_tokens", "invalid_value", "(an integer of 5000 digits)"),
        id="5000-digit-integer",
    ),
    pytest.param(
        "/v1/completions",
        b'{"prompt": "hi", "stop": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        (None, "invalid_json", "nests arrays or objects too deeply"),
        id="nested-2000-deep",
    ),
    pytest.param(
        "/v1/completions",
        b'{"prompt": "ab\\ud800cd", "max_tokens": 1}',
        ("prompt", "invalid_value", "'prompt' holds a lone surrogate (\\ud800 at character 2)"),
        id="surrogate-prompt",
    ),
    pytest.param(
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        ("messages[0].content", "invalid_value", "lone surrogate (\\ud800 at character 0)"),
        id="surrogate-chat-content",
    ),
    pytest.param(
        "/v1/completions",
        b'{"prompt": "hi", "model": "\\udcff"}',
        ("model", "invalid_value", "'model' holds a lone surrogate (\\udcff"),
        id="surrogate-model",
    ),
    pytest.param(
        "/v1/completions",
        b'{"prompt": "hi", "\\ud800": 1}',
        (None, "invalid_value", "A field name holds a lone surrogate"),
        id="surrogate-field-name",
    ),
]


@pytest.fixture(scope="module")
def fake_server():
    scheduler = FakeScheduler(context_limit=64)
    with live_server(create_app(scheduler, MODEL)) as (_, url):
        yield scheduler, url


@pytest.mark.parametrize("path, raw, expected", HOSTILE)
def test_hostile_bodies_are_400_naming_the_field(fake_server, path, raw, expected):
    scheduler, url = fake_server
    before = len(scheduler.requests)
    error = refusal(httpx.post(url + path, content=raw, headers=JSON))
    param, code, words = expected
    assert (error["param"], error["code"]) == (param, code)
    assert words in error["message"]
    assert len(scheduler.requests) == before  # nothing reached the scheduler
    assert httpx.post(url + "/v1/completions", json=PROMPT).status_code == 200  # and the server goes on


# every 400 has a code; HEAD /health ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param, code",
    [
        ({**PROMPT, "stop": [""]}, "stop", "invalid_value"),
        ({**PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({**PROMPT, "prompt": ""}, "prompt", "empty_prompt"),
        ({**PROMPT, "prompt": ["a", "b"]}, "prompt", "invalid_value"),
        ({**PROMPT, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ],
    ids=["empty-stop", "5-stops", "empty-prompt", "two-prompts", "stream_options-without-stream"],
)
def test_every_400_has_a_code(fake_server, body, param, code):
    error = refusal(httpx.post(fake_server[1] + "/v1/completions", json=body))
    assert (error["param"], error["code"]) == (param, code)


def test_the_chat_400s_have_codes_too(fake_server):
    url = fake_server[1] + "/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    both = {"messages": messages, "max_tokens": 3, "max_completion_tokens": 4}
    assert refusal(httpx.post(url, json=both))["code"] == "invalid_value"
    scheduler = FakeScheduler()
    scheduler.tokenizer.chat_template = None  # no chat template: refused, with a code
    with TestClient(create_app(scheduler, MODEL)) as client:
        response = client.post("/v1/chat/completions", json={"messages": messages})
    assert refusal(response)["code"] == "unsupported_value"


def test_head_health_is_answered(fake_server):
    response = httpx.head(fake_server[1] + "/health")
    assert response.status_code == 200 and response.content == b""


# an API key that is not ASCII -----------------------------------------------------------------------------
def test_a_non_ascii_api_key_authenticates_as_utf8_bytes():
    with live_server(create_app(FakeScheduler(), MODEL, api_key="ключ-123")) as (_, url):
        good = httpx.post(url + "/v1/completions", json=PROMPT, headers={"Authorization": "Bearer ключ-123".encode()})
        assert good.status_code == 200, good.text
        wrong = httpx.post(url + "/v1/completions", json=PROMPT, headers={"Authorization": "Bearer ключ-124".encode()})
        assert refusal(wrong, 401)["code"] == "invalid_api_key"
    for key in (" key", "key\n", "", "a\x00b"):
        with pytest.raises(ConfigError, match="api_key"):
            api_key_bytes(key)


def test_a_key_no_request_can_carry_is_refused_before_the_model_loads(capsys, no_model):
    assert cli.main(["serve", "--api-key", "key "]) == 2
    assert "api_key" in capsys.readouterr().err


# tokenizing: a cheap bound first, then off the event loop, stopping early ----------------------------------
class RecordingTokenizer(CharTokenizer):
    """One token per character (or per word, with ``words``); records what it tokenizes; ``delay`` seconds
    for a text of 1,000 characters or more; a vocabulary whose longest entry has ``longest`` characters."""

    def __init__(self, longest: int | None = None, words: bool = False, delay: float = 0.0) -> None:
        self.longest, self.words, self.delay = longest, words, delay
        self.texts: list[str] = []
        self.templates = 0
        self.started = threading.Event()

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self.texts.append(text)
        self.started.set()
        if len(text) >= 1000:
            time.sleep(self.delay)
        if self.words:
            return {"input_ids": [len(word) for word in text.split()]}
        return super().__call__(text, add_special_tokens)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        self.templates += 1
        return super().apply_chat_template(messages, tokenize, add_generation_prompt)

    def get_vocab(self) -> dict[str, int]:
        return {"x" * self.longest: 0} if self.longest else {}


def _fake_with(tokenizer: RecordingTokenizer, context_limit: int = 64) -> FakeScheduler:
    scheduler = FakeScheduler(context_limit=context_limit)
    scheduler.tokenizer = tokenizer
    return scheduler


def test_tokenizing_does_not_stall_the_event_loop():
    tokenizer = RecordingTokenizer(delay=1.0)
    with live_server(create_app(_fake_with(tokenizer, 4096), MODEL)) as (_, url):
        slow = threading.Thread(
            target=httpx.post, args=(url + "/v1/completions",), kwargs={"json": {**PROMPT, "prompt": "ab " * 500}}
        )
        slow.start()
        assert tokenizer.started.wait(10)
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        waited = time.monotonic() - started
        slow.join()
    assert waited < 0.5, f"/health waited {waited:.2f} s for a tokenization"


def test_a_prompt_too_long_by_its_characters_is_refused_without_tokenizing():
    tokenizer = RecordingTokenizer(longest=3)
    with TestClient(create_app(_fake_with(tokenizer), MODEL)) as client:  # 63 tokens of prompt room at most
        response = client.post("/v1/completions", json={"prompt": "a" * (63 * 3 + 1), "max_tokens": 1})
        error = refusal(response)
        assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
        said = "more than 63 tokens (190 characters besides whitespace, and no token is longer than 3)"
        assert said in error["message"]
        fits = client.post("/v1/completions", json={"prompt": "a" * 63, "max_tokens": 1})
        assert fits.status_code == 200
        assert tokenizer.texts == ["a" * 63]
        many = {"messages": [{"role": "user", "content": "a"}] * 64, "max_tokens": 1}
        error = refusal(client.post("/v1/chat/completions", json=many))
        assert error["param"] == "messages" and "'messages' holds 64 messages: more than the 63" in error["message"]
        assert tokenizer.templates == 0  # refused before the template ran


def test_a_long_prompt_is_refused_on_a_prefix_and_a_fitting_one_is_tokenized_whole():
    tokenizer = RecordingTokenizer(longest=100)  # the character bound (6,300 characters) lets 3,000 through
    with TestClient(create_app(_fake_with(tokenizer), MODEL)) as client:
        error = refusal(client.post("/v1/completions", json={"prompt": "ab " * 1000, "max_tokens": 1}))
        assert error["code"] == "context_length_exceeded" and "its first" in error["message"]
    assert max(len(text) for text in tokenizer.texts) < 600  # 3,000 characters, never tokenized whole
    words = RecordingTokenizer(longest=100, words=True)
    scheduler = _fake_with(words)
    prompt = " ".join(f"word{index:06d}" for index in range(60))  # 60 tokens in 659 characters
    with TestClient(create_app(scheduler, MODEL)) as client:
        assert client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).status_code == 200
    assert scheduler.requests[-1].prompt_ids == (10,) * 60 and words.texts[-1] == prompt
    assert len(words.texts) == 2  # one prefix counted, then the whole text


# --max-context below the floor is refused at start -----------------------------------------------------
def test_a_max_context_that_cannot_serve_is_refused_at_start(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--max-context", "14"])
    assert "--max-context: must be at least 15, got 14" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["serve", "--max-context", "15"]).max_context == 15


def test_the_character_bound_holds_for_tokenizers_that_drop_whitespace_or_take_whole_words():
    """A whitespace-splitting word-level tokenizer gives ``"w1 w2"`` 2 tokens for 5 characters, and an unknown
    word of any length 1 token: the character bound would refuse prompts that fit, so it counts no whitespace
    and is skipped for whole-word vocabularies. A BPE vocabulary keeps it (whitespace not counted)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from omnikv_runtime.serve.prompts import PromptEncoder, longest_token_chars

    words = Tokenizer(models.WordLevel({"w1": 1, "w2": 2, "[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level = PreTrainedTokenizerFast(tokenizer_object=words)
    assert longest_token_chars(word_level) is None
    prompt = " ".join(["w1", "w2", "averyveryverylongunknownword"] * 10)  # 30 tokens, 250 characters
    assert PromptEncoder(word_level, 40).encode(prompt, False, 1, "prompt") == (1, 2, 0) * 10
    pieces = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    pieces.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe = PreTrainedTokenizerFast(tokenizer_object=pieces)
    assert longest_token_chars(bpe) == 2
    spaced = "  ".join(["ab"] * 30)  # 30 tokens: 60 characters besides whitespace, 118 with it
    assert len(PromptEncoder(bpe, 40).encode(spaced, False, 1, "prompt")) == 30
    with pytest.raises(Exception, match="more than 29 tokens .62 characters besides whitespace"):
        PromptEncoder(bpe, 30).encode(spaced + " ab", False, 1, "prompt")
