"""LLM backends: llama.cpp with the embedded SmolLM2, an OpenAI-compatible fake server, tiny transformers."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fakes import fake_server, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.llm import LLM, ChatMessage, LLMError, OpenAICompatibleLLM, create_llm

# Nothing may come from a model hub, in the code under test or in the test itself.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

QUESTION = [
    ChatMessage("system", "You are a helpful assistant. Answer briefly."),
    ChatMessage("user", "What is two plus two?"),
]
STORY = [ChatMessage("user", "Write a very long story about a brave knight, a dragon and a castle.")]


@pytest.fixture(scope="module")
def executors() -> Iterator[Executors]:
    pools = Executors.create()
    yield pools
    pools.shutdown()


async def reply(llm: LLM, messages: list[ChatMessage]) -> str:
    return "".join([delta async for delta in llm.stream(messages)])


async def first_delta(llm: LLM, messages: list[ChatMessage]) -> str:
    """The first delta of a reply; the rest is not generated."""
    stream = llm.stream(messages)
    assert isinstance(stream, AsyncIterator)
    try:
        return await anext(stream)
    finally:
        await stream.aclose()


#: Deltas a stopped job may still produce: the ones in its hand-off queue (maxsize) and the one being made.
DELTAS_IN_FLIGHT = 4


def count_deltas_produced(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many deltas each generation job on ``llm``'s model produced (counted in its thread), in order.

    A test-only wrapper around the backend's ``ModelTurns.stream``: it counts,
    it changes nothing. The counts show whether a job whose consumer left
    stopped at once, without timing anything.
    """
    turns = llm._turns  # type: ignore[attr-defined]
    produced: list[int] = []
    original = turns.stream

    def stream(produce, *, maxsize: int = 16):  # type: ignore[no-untyped-def]
        index = len(produced)
        produced.append(0)

        def counted(emit, stop):  # type: ignore[no-untyped-def]
            def emit_counted(item: str) -> bool:
                produced[index] += 1
                return emit(item)

            return produce(emit_counted, stop)

        return original(counted, maxsize=maxsize)

    monkeypatch.setattr(turns, "stream", stream)
    return produced


async def produced_after_cancel(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Start a long reply, stop reading after its first delta, then ask again; deltas each job produced."""
    produced = count_deltas_produced(llm, monkeypatch)
    assert await first_delta(llm, STORY)
    assert await first_delta(llm, QUESTION)  # its turn on the model comes only once the story's job ended
    return produced


async def produced_after_task_cancel(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Like ``produced_after_cancel`` but the consuming task is cancelled (barge-in)."""
    produced = count_deltas_produced(llm, monkeypatch)
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in llm.stream(STORY):
            got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await first_delta(llm, QUESTION)
    return produced


def stopped_at_once(produced: list[int], max_tokens: int) -> bool:
    """The story's job stopped within the deltas in flight, far from its ``max_tokens``; the next job ran."""
    story, question = produced[0], produced[1]
    return 1 <= story <= 1 + DELTAS_IN_FLIGHT < max_tokens and question >= 1


# --- llama.cpp with the embedded SmolLM2 ----------------------------------


@pytest.fixture(scope="module")
async def smollm(executors: Executors) -> AsyncIterator[LLM]:
    llm = create_llm(Settings(llm={"backend": "llama-cpp", "max_tokens": 32, "temperature": 0.0}), executors)
    yield llm
    await llm.aclose()


@pytest.fixture(scope="module")
async def smollm_long(executors: Executors) -> AsyncIterator[LLM]:
    # A long reply cap makes "stops promptly" observable: finishing it would take seconds.
    llm = create_llm(Settings(llm={"backend": "llama-cpp", "max_tokens": 400, "temperature": 0.0}), executors)
    yield llm
    await llm.aclose()


@pytest.mark.slow
async def test_llama_cpp_answers(smollm: LLM) -> None:
    assert smollm.name == "llama-cpp"
    deltas = [delta async for delta in smollm.stream(QUESTION)]
    assert len(deltas) > 1
    assert "".join(deltas).strip()


@pytest.mark.slow
async def test_llama_cpp_stops_when_consumer_leaves(smollm_long: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    produced = await produced_after_cancel(smollm_long, monkeypatch)
    assert stopped_at_once(produced, 400), produced


@pytest.mark.slow
async def test_llama_cpp_stops_when_task_cancelled(smollm_long: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    produced = await produced_after_task_cancel(smollm_long, monkeypatch)
    assert stopped_at_once(produced, 400), produced


@pytest.mark.slow
async def test_llama_cpp_serialises_concurrent_sessions(smollm: LLM) -> None:
    first, second = await asyncio.gather(reply(smollm, QUESTION), reply(smollm, QUESTION))
    assert first == second  # greedy decoding: the same reply when not interleaved


@pytest.mark.slow
def test_llama_cpp_counts_tokens(smollm: LLM) -> None:
    assert 3 <= smollm.count_tokens("What is two plus two?") <= 10


def test_llama_cpp_missing_model(tmp_path: Path, executors: Executors) -> None:
    with pytest.raises(LLMError, match="does not exist"):
        create_llm(
            Settings(llm={"backend": "llama-cpp", "llama_cpp": {"model_path": tmp_path / "missing.gguf"}}), executors
        )


def test_llama_cpp_invalid_model(tmp_path: Path, executors: Executors) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(LLMError, match="valid GGUF"):
        create_llm(Settings(llm={"backend": "llama-cpp", "llama_cpp": {"model_path": bogus}}), executors)


# --- OpenAI-compatible, against a fake server -----------------------------




class FakeOpenAIServer:
    """A fake ``/v1/chat/completions`` that streams SSE like vLLM or llama.cpp server do.

    The model name picks the behaviour: "ok" streams a fixed reply, "endless"
    streams until the client goes away, "broken" answers HTTP 500, "slow"
    answers after a delay.
    """

    REPLY = ["Hel", "lo", " there", ", friend", "!"]

    def __init__(self) -> None:
        self.requests: list[dict[str, object]] = []
        self.client_left = threading.Event()
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])])

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append({"body": body, "authorization": request.headers.get("authorization")})
        model = body["model"]
        if model == "broken":
            return JSONResponse({"error": {"message": "CUDA out of memory"}}, status_code=500)
        if model == "slow":
            await asyncio.sleep(1.0)
        return StreamingResponse(self.events(model), media_type="text/event-stream")

    async def events(self, model: str) -> AsyncIterator[str]:
        def event(payload: object) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        yield ": keep-alive comment\n\n"
        yield event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        try:
            if model == "endless":
                while True:
                    yield event({"choices": [{"index": 0, "delta": {"content": "word "}}]})
                    await asyncio.sleep(0.01)
            for piece in self.REPLY:
                yield event({"choices": [{"index": 0, "delta": {"content": piece}}]})
                await asyncio.sleep(0.005)
            yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            yield event({"choices": [], "usage": {"completion_tokens": 5}})
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.client_left.set()
            raise


@pytest.fixture(scope="module")
def openai_server() -> Iterator[tuple[FakeOpenAIServer, str]]:
    fake = FakeOpenAIServer()
    with fake_server(fake.app) as base_url:
        yield fake, base_url


async def test_openai_streams_deltas_in_order_with_auth(
    openai_server: tuple[FakeOpenAIServer, str], executors: Executors
) -> None:
    fake, base_url = openai_server
    settings = Settings(
        llm={"backend": "openai", "openai": {"base_url": base_url, "model": "ok", "api_key": "sk-secret"}}
    )
    llm = create_llm(settings, executors)
    assert isinstance(llm, OpenAICompatibleLLM)
    fake.requests.clear()
    deltas = [delta async for delta in llm.stream(QUESTION)]
    await llm.aclose()
    assert deltas == FakeOpenAIServer.REPLY
    [request] = fake.requests
    assert request["authorization"] == "Bearer sk-secret"
    body = request["body"]
    assert isinstance(body, dict)
    assert body["stream"] is True
    assert body["model"] == "ok"
    assert body["max_tokens"] == settings.llm.max_tokens
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in QUESTION]


async def test_openai_cancel_closes_the_stream(openai_server: tuple[FakeOpenAIServer, str]) -> None:
    fake, base_url = openai_server
    fake.client_left.clear()
    llm = OpenAICompatibleLLM(base_url, model="endless")
    stream = llm.stream(QUESTION)
    assert isinstance(stream, AsyncIterator)
    assert await anext(stream) == "word "
    await stream.aclose()
    # The server sees the connection close, which is how serving engines stop generating.
    assert await asyncio.to_thread(fake.client_left.wait, 5)
    assert await reply(OpenAICompatibleLLM(base_url, model="ok"), QUESTION) == "Hello there, friend!"
    await llm.aclose()


async def test_openai_http_error_carries_server_text(openai_server: tuple[FakeOpenAIServer, str]) -> None:
    _, base_url = openai_server
    llm = OpenAICompatibleLLM(base_url, model="broken")
    with pytest.raises(LLMError, match=r"HTTP 500.*CUDA out of memory"):
        await reply(llm, QUESTION)
    await llm.aclose()


async def test_openai_timeout(openai_server: tuple[FakeOpenAIServer, str]) -> None:
    _, base_url = openai_server
    llm = OpenAICompatibleLLM(base_url, model="slow", timeout_s=0.2)
    with pytest.raises(LLMError, match=r"did not answer within 0\.2 s"):
        await reply(llm, QUESTION)
    await llm.aclose()


async def test_openai_dead_server_fails_fast_and_clearly() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    llm = OpenAICompatibleLLM(url, timeout_s=10)
    with pytest.raises(
        LLMError, match=r"LLM server at http://127\.0\.0\.1:\d+/v1/chat/completions is unreachable: connection refused"
    ):
        await reply(llm, QUESTION)  # refused at once: not the 10 s timeout's "timed out"
    await llm.aclose()


# --- transformers, with a tiny random-weight Llama built here -------------

has_transformers = (
    importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
)
needs_transformers = pytest.mark.skipif(not has_transformers, reason="torch and transformers are not installed")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama and a word-level tokenizer with a chat template, saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    special = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = [
        "system user assistant what is two plus two four the knight met a dragon near the castle",
        "you are a helpful assistant answer briefly write a very long story about brave and",
    ]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=special))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    # Only words: the reply never ends early (so it can be interrupted) and is never all special tokens.
    model.generation_config.suppress_tokens = fast.convert_tokens_to_ids(special)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
async def tiny_llm(tiny_model_dir: Path, executors: Executors) -> AsyncIterator[LLM]:
    llm = create_llm(
        Settings(
            llm={
                "backend": "transformers",
                "transformers": {"model_path": tiny_model_dir},
                "max_tokens": 300,
                "temperature": 0.0,
            }
        ),
        executors,
    )
    yield llm
    await llm.aclose()


@needs_transformers
async def test_transformers_streams_text(tiny_model_dir: Path, executors: Executors) -> None:
    llm = create_llm(
        Settings(llm={"backend": "transformers", "transformers": {"model_path": tiny_model_dir}, "max_tokens": 12}),
        executors,
    )
    assert llm.name == "transformers"
    deltas = [delta async for delta in llm.stream(QUESTION)]
    assert len(deltas) > 1
    assert len("".join(deltas).split()) == 12  # the word-level tokenizer decodes one word per token
    await llm.aclose()


@needs_transformers
async def test_transformers_stops_when_consumer_leaves(tiny_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    produced = await produced_after_cancel(tiny_llm, monkeypatch)
    assert stopped_at_once(produced, 300), produced


@needs_transformers
async def test_transformers_stops_when_task_cancelled(tiny_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    produced = await produced_after_task_cancel(tiny_llm, monkeypatch)
    assert stopped_at_once(produced, 300), produced


@needs_transformers
def test_transformers_counts_tokens(tiny_llm: LLM) -> None:
    assert tiny_llm.count_tokens("what is two plus two") == 5


@needs_transformers
async def test_transformers_without_chat_template(tiny_model_dir: Path, tmp_path: Path, executors: Executors) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((plain / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    llm = create_llm(
        Settings(llm={"backend": "transformers", "transformers": {"model_path": plain}, "max_tokens": 5}), executors
    )
    assert await reply(llm, QUESTION)
    await llm.aclose()


def test_transformers_needs_a_model_folder(executors: Executors) -> None:
    with pytest.raises(LLMError, match="model_path"):
        create_llm(Settings(llm={"backend": "transformers"}), executors)


@needs_transformers
def test_transformers_missing_folder(tmp_path: Path, executors: Executors) -> None:
    with pytest.raises(LLMError, match="does not exist"):
        create_llm(
            Settings(llm={"backend": "transformers", "transformers": {"model_path": tmp_path / "nothing"}}), executors
        )
