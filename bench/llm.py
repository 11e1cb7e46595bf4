"""LLM backends head to head: tokens per second and first-token latency, one stream and several at once.

Loads the embedded model with each backend (``llama-cpp``: llama.cpp in-process;
``llama-server``: the supervised llama-server with parallel slots) and measures:

- ``--streams`` 1 and 4: sessions asking at once (each with its own session
  key), first-token latency of each (cold: the session's first question;
  cached: the same session asking again, its prompt already in its slot) and
  generated tokens per second, each stream's and all together;
- ``--turns`` N: one session's conversation through the dialogue memory with
  the persona's examples, first-token latency of every turn, so a slower turn
  as the history window starts sliding shows (turns 2-6 against the last five).

Usage: python bench/llm.py [--backend both|llama-cpp|llama-server] [--threads N] [--turns 30] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.llm import LLM, ChatMessage, DialogueMemory, create_llm

PROMPTS = [
    "Tell me a long story about a fox who learns to sail.",
    "Describe in detail how bread is made, step by step.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Explain at length why the seasons change during the year.",
]
CONVERSATION = [
    "Hi, how are you today?",
    "What is the capital of Spain?",
    "How many people live there?",
    "What is a famous dish from Spain?",
    "How do you cook it?",
    "What else should I eat there?",
    "Which museums should I visit?",
    "What is the weather like in summer?",
    "And in winter?",
    "How do I get from the airport to the city?",
    "Is it safe to walk at night?",
    "What language do they speak?",
    "How do you say thank you in Spanish?",
    "What about good morning?",
    "Can you recommend a day trip?",
]


@dataclass
class Stream:
    """One generation: when it started, when its first and last token came, how many tokens."""

    started: float = 0.0
    first: float | None = None
    last: float = 0.0
    tokens: int = 0
    text: list[str] = field(default_factory=list)


async def generate(llm: LLM, messages: list[ChatMessage], key: str) -> Stream:
    stream = Stream(started=time.perf_counter())
    async for delta in llm.stream(messages, session_key=key):
        now = time.perf_counter()
        if stream.first is None:
            stream.first = now
        stream.last = now
        stream.tokens += 1
        stream.text.append(delta)
    return stream


def summarise(streams: list[Stream]) -> dict[str, float]:
    firsts = [(s.first - s.started) * 1000.0 for s in streams if s.first is not None]
    total_tokens = sum(s.tokens for s in streams)
    wall = max(s.last for s in streams) - min(s.started for s in streams)
    per_stream = [
        (s.tokens - 1) / (s.last - s.first) for s in streams if s.first is not None and s.tokens > 1 and s.last > s.first
    ]
    return {
        "first_token_ms_min": round(min(firsts), 1),
        "first_token_ms_max": round(max(firsts), 1),
        "tokens_per_s_each": round(statistics.mean(per_stream), 1),
        "tokens_per_s_together": round(total_tokens / wall, 1),
        "tokens": total_tokens,
    }


async def concurrent(llm: LLM, count: int, tag: str) -> dict[str, dict[str, float]]:
    system = ChatMessage("system", "You are a helpful assistant.")
    asks = [[system, ChatMessage("user", PROMPTS[i % len(PROMPTS)])] for i in range(count)]
    cold = await asyncio.gather(*(generate(llm, asks[i], f"{tag}-{i}") for i in range(count)))
    cached = await asyncio.gather(*(generate(llm, asks[i], f"{tag}-{i}") for i in range(count)))
    return {"cold": summarise(cold), "cached": summarise(cached)}


async def conversation(llm: LLM, settings: Settings, turns: int) -> dict[str, object]:
    persona = settings.persona
    memory = DialogueMemory(
        persona.system_prompt,
        settings.llm.history_turns,
        settings.llm.history_tokens,
        llm.count_tokens,
        examples=persona.examples,
    )
    firsts: list[float] = []
    for turn in range(turns):
        memory.add_user(CONVERSATION[turn % len(CONVERSATION)])
        result = await generate(llm, memory.messages(), "conversation")
        firsts.append(round(((result.first or result.last) - result.started) * 1000.0, 1))
        memory.add_assistant("".join(result.text))
    early = statistics.median(firsts[1:6])
    late = statistics.median(firsts[-5:])
    return {"first_token_ms": firsts, "turns_2_6_median": early, "last_5_median": late, "ratio": round(late / early, 2)}


async def measure(backend: str, threads: int | None, threads_batch: int | None, turns: int) -> dict[str, object]:
    overrides: dict[str, object] = {"backend": backend, "max_tokens": 128}
    if threads is not None:
        overrides["llama_cpp"] = {"threads": threads}
        overrides["llama_server"] = {"threads": threads, "threads_batch": threads_batch or threads}
    settings = Settings(llm=overrides)
    executors = Executors.create(settings.executors)
    started = time.perf_counter()
    llm = await asyncio.to_thread(create_llm, settings, executors)
    loaded_s = time.perf_counter() - started
    try:
        await llm.warm_up([ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", "Hello!")])
        section = settings.llm.llama_cpp if backend == "llama-cpp" else settings.llm.llama_server
        result: dict[str, object] = {"backend": backend, "threads": section.threads, "load_s": round(loaded_s, 2)}
        if backend == "llama-server":
            result["threads_batch"] = settings.llm.llama_server.threads_batch
        for count in (1, 4):
            result[f"streams_{count}"] = await concurrent(llm, count, f"s{count}")
        if turns:
            result["conversation"] = await conversation(llm, settings, turns)
        return result
    finally:
        await llm.aclose()
        executors.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["both", "llama-cpp", "llama-server"], default="both")
    parser.add_argument("--threads", type=int, help="threads of both backends (default: each one's setting)")
    parser.add_argument("--threads-batch", type=int, help="llama-server's prompt threads (default: --threads)")
    parser.add_argument("--turns", type=int, default=30, help="turns of the one-session conversation (0: skip)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    backends = ["llama-cpp", "llama-server"] if args.backend == "both" else [args.backend]
    results = [asyncio.run(measure(backend, args.threads, args.threads_batch, args.turns)) for backend in backends]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"cpus={os.cpu_count()}")
    for result in results:
        print(f"\n{result['backend']} (threads={result['threads']}, started in {result['load_s']} s)")
        for count in (1, 4):
            for phase in ("cold", "cached"):
                figures = result[f"streams_{count}"][phase]  # type: ignore[index]
                print(
                    f"  {count} stream(s) {phase:<6}  first token {figures['first_token_ms_min']:>7.1f}"
                    f"-{figures['first_token_ms_max']:<7.1f} ms  tokens/s each {figures['tokens_per_s_each']:>6.1f}"
                    f"  together {figures['tokens_per_s_together']:>6.1f}"
                )
        if "conversation" in result:
            talk = result["conversation"]
            print(f"  conversation first token per turn (ms): {talk['first_token_ms']}")  # type: ignore[index]
            print(
                f"  turns 2-6 median {talk['turns_2_6_median']:.1f} ms, last five median {talk['last_5_median']:.1f}"  # type: ignore[index]
                f" ms, ratio {talk['ratio']}"  # type: ignore[index]
            )


if __name__ == "__main__":
    main()
