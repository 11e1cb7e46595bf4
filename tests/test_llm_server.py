"""The supervised llama-server backend: slots per session, concurrent greedy generation, restarts.

The integration tests run the real ``llama-server`` that `make setup` builds,
with the embedded SmolLM2, and are skipped (with the reason) where it is not
built.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from avatalk.client import AvatalkClient
from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.llm import ChatMessage, LLMError, create_llm
from avatalk.llm.llama_server import LlamaServerLLM, SlotTable, find_llama_server, server_arguments

SYSTEM = ChatMessage("system", "You are a helpful assistant. Answer in one short sentence.")
QUESTIONS = [
    "What is the capital of Germany?",
    "Name three colours of the rainbow.",
    "What do cows drink?",
    "Why is the sea salty?",
]
STORY = "Tell me a long story about a lighthouse keeper and a storm."


def conversation(question: str) -> list[ChatMessage]:
    return [SYSTEM, ChatMessage("user", question)]


def have_llama_server() -> bool:
    try:
        find_llama_server(None)
    except LLMError:
        return False
    return True


_skip_without_server = pytest.mark.skipif(
    not have_llama_server(), reason="llama-server is not built (run `make setup`, which compiles it once)"
)


def needs_llama_server(test: Callable[..., Any]) -> Callable[..., Any]:
    """Runs the real llama-server with the embedded model: skipped where it is not built, and slow."""
    return pytest.mark.slow(_skip_without_server(test))


# --- slots: which session decodes where ---------------------------------------------------


def test_a_session_keeps_its_slot_and_sessions_get_different_slots() -> None:
    table = SlotTable(3)
    first = [table.acquire(key) for key in ("a", "b", "c")]
    assert sorted(first) == [0, 1, 2]
    for slot in first:
        table.release(slot)
    assert [table.acquire(key) for key in ("c", "a", "b")] == [first[2], first[0], first[1]]


def test_a_new_session_takes_the_least_recently_used_idle_slot() -> None:
    table = SlotTable(2)
    a, b = table.acquire("a"), table.acquire("b")
    table.release(a)
    table.release(b)
    table.release(table.acquire("a"))  # "a" is now the more recent one
    assert table.acquire("c") == b  # "b" was least recently used
    assert table.acquire("b") == a  # "b" comes back: takes the slot of "a", which is idle


def test_no_slot_of_its_own_when_every_slot_is_generating() -> None:
    table = SlotTable(2)
    table.acquire("a")
    table.acquire("b")
    assert table.acquire("c") == -1  # the server picks a free slot or queues the request
    assert table.acquire(None) == -1


def test_missing_program_is_reported_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(LLMError, match="does not exist or is not executable"):
        find_llama_server(tmp_path / "nothing")


def test_command_line_has_slots_batching_and_prompt_cache() -> None:
    settings = Settings(llm={"llama_server": {"parallel": 3, "context_tokens": 1024, "threads": 1}})
    arguments = server_arguments(settings.llm.llama_server, Path("model.gguf"))
    joined = " ".join(arguments)
    assert "--parallel 3" in joined and "--ctx-size 3072" in joined
    assert "--cont-batching" in arguments and "--cache-prompt" in arguments
    assert "--threads 1" in joined


# --- the real llama-server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def executors() -> Iterator[Executors]:
    pools = Executors.create()
    yield pools
    pools.shutdown()


def server_settings(**llm: object) -> Settings:
    return Settings(llm={"backend": "llama-server", "temperature": 0.0, **llm})


@pytest.fixture(scope="module")
async def served(executors: Executors) -> AsyncIterator[LlamaServerLLM]:
    llm = create_llm(server_settings(max_tokens=48), executors)
    assert isinstance(llm, LlamaServerLLM)
    yield llm
    await llm.aclose()


async def tokens(llm: LlamaServerLLM, messages: list[ChatMessage], key: str | None) -> list[str]:
    return [delta async for delta in llm.stream(messages, session_key=key)]


@needs_llama_server
async def test_it_is_the_embedded_default() -> None:
    assert Settings().llm.backend == "llama-server"


@needs_llama_server
async def test_concurrent_generations_give_the_same_tokens_as_one_at_a_time(served: LlamaServerLLM) -> None:
    alone = [await tokens(served, conversation(question), f"alone-{i}") for i, question in enumerate(QUESTIONS)]
    assert all(len(reply) > 3 for reply in alone)
    together = await asyncio.gather(
        *(tokens(served, conversation(question), f"together-{i}") for i, question in enumerate(QUESTIONS))
    )
    assert together == alone


@needs_llama_server
async def test_cancelling_one_generation_leaves_the_others_unchanged(served: LlamaServerLLM) -> None:
    alone = [await tokens(served, conversation(question), f"alone-{i}") for i, question in enumerate(QUESTIONS[:3])]
    started = asyncio.Event()
    received: list[str] = []

    async def cancelled_one() -> None:
        async for delta in served.stream(conversation(STORY), session_key="cancelled"):
            received.append(delta)
            started.set()

    victim = asyncio.create_task(cancelled_one())
    others = [
        asyncio.create_task(tokens(served, conversation(question), f"survivor-{i}"))
        for i, question in enumerate(QUESTIONS[:3])
    ]
    await asyncio.wait_for(started.wait(), 60)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert await asyncio.gather(*others) == alone
    assert 0 < len(received) < 48  # it really was cut short
    # Its slot is free again: the same session gets a complete reply.
    assert await tokens(served, conversation(QUESTIONS[0]), "cancelled") == alone[0]


@needs_llama_server
async def test_a_session_keeps_its_prefix_cached_so_a_new_turn_prefills_only_the_new_message(
    served: LlamaServerLLM,
) -> None:
    history = conversation(QUESTIONS[1])
    first = "".join(await tokens(served, history, "cached"))
    first_prompt = served.prompt_stats["cached"]
    # Another session's turn in between must not evict this one's prefix.
    await tokens(served, conversation(QUESTIONS[2]), "someone-else")
    follow_up = [*history, ChatMessage("assistant", first), ChatMessage("user", "And one more colour?")]
    assert "".join(await tokens(served, follow_up, "cached"))
    second_prompt = served.prompt_stats["cached"]
    assert second_prompt.cached >= first_prompt.prefilled + first_prompt.cached - 1
    assert second_prompt.prefilled < first_prompt.prefilled + first_prompt.cached


@needs_llama_server
async def test_a_prefill_while_the_user_speaks_leaves_the_reply_only_the_last_words(served: LlamaServerLLM) -> None:
    question = "Please name three colours of the rainbow and say which one is your favourite."
    cold = "".join(await tokens(served, conversation(question), "cold"))
    cold_prompt = served.prompt_stats["cold"]
    await served.prefill(conversation(question[:40]), session_key="warm")  # a partial transcript
    warm = "".join(await tokens(served, conversation(question), "warm"))
    warm_prompt = served.prompt_stats["warm"]
    assert warm == cold  # the prefill changes nothing in the reply
    assert warm_prompt.prefilled + warm_prompt.cached == cold_prompt.prefilled + cold_prompt.cached
    assert warm_prompt.prefilled < cold_prompt.prefilled - 5  # the partial's words came from the cache


@needs_llama_server
async def test_killed_server_is_restarted_and_the_reply_in_flight_fails_clearly(executors: Executors) -> None:
    llm = create_llm(server_settings(max_tokens=400), executors)
    assert isinstance(llm, LlamaServerLLM)
    try:
        first_pid = llm.server.pid
        assert first_pid is not None
        stream = llm.stream(conversation(STORY), session_key="doomed")
        assert await anext(stream)
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(LLMError, match=r"llama-server\) stopped during the reply.*being restarted"):
            async with asyncio.timeout(60):  # a hang fails the test instead of stalling the run
                async for _delta in stream:
                    pass
        assert await llm.server.wait_ready(60)
        assert llm.server.restarts == 1
        assert llm.server.pid not in (None, first_pid)
        assert "".join(await tokens(llm, conversation(QUESTIONS[0]), "doomed")).strip()
    finally:
        await llm.aclose()
    # Stopped on shutdown: the process is gone.
    assert llm.server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)


@needs_llama_server
async def test_a_request_during_the_restart_waits_for_the_new_process(executors: Executors) -> None:
    llm = create_llm(server_settings(max_tokens=8), executors)
    assert isinstance(llm, LlamaServerLLM)
    try:
        pid = llm.server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert await llm.server.wait_exit(10) == -signal.SIGKILL
        # Asked while the supervisor restarts it: answered by the new process, not refused.
        assert "".join(await tokens(llm, conversation(QUESTIONS[0]), None)).strip()
        assert llm.server.restarts == 1
    finally:
        await llm.aclose()


@needs_llama_server
def test_a_server_that_cannot_start_fails_with_its_output(tmp_path: Path, executors: Executors) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(LLMError, match="exited with status"):
        create_llm(server_settings(llama_server={"model_path": bogus}), executors)


@needs_llama_server
async def test_a_turn_in_flight_when_the_server_dies_ends_with_a_clear_error_and_the_next_is_answered(
    live_server_factory, engine_models, executors: Executors
) -> None:
    from avatalk.streaming.models import EngineModels

    llm = create_llm(server_settings(max_tokens=400), executors)
    assert isinstance(llm, LlamaServerLLM)
    models = EngineModels(vad=engine_models.vad, asr=engine_models.asr, llm=llm, tts=engine_models.tts)
    server = live_server_factory(models=models)
    client = AvatalkClient(server.ws_url)
    await client.connect()
    try:
        await client.wait_for(lambda e: e["type"] == "session.created")
        await client.configure(16000, 24000, greeting=False)
        mark = len(client.events)
        await client.send_event("conversation.item.create", text=STORY)
        await client.wait_for(lambda e: e["type"] == "response.text.delta", since=mark, timeout=60)
        pid = llm.server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        error = await client.wait_for(lambda e: e["type"] == "error", since=mark, timeout=60)
        assert error["code"] == "llm_error"
        assert "llama-server) stopped during the reply" in error["message"]
        failed = await client.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=60)
        assert failed["status"] == "failed" and failed["turn_id"] == error["turn_id"]
        # The supervisor brings it back; the next question is answered by the new process.
        mark = len(client.events)
        await client.send_event("conversation.item.create", text=QUESTIONS[0])
        done = await client.wait_for(
            lambda e: e["type"] == "response.done" and e["status"] == "completed" and "Sorry" not in e["text"],
            since=mark,
            timeout=90,
        )
        assert done["text"].strip()
        assert llm.server.restarts == 1 and llm.server.pid not in (None, pid)
    finally:
        await client.close()
        await llm.aclose()
