"""Does a long conversation slow the reply down? LLM first token per turn of one typed conversation.

Starts `avatalk serve` (or uses --url), types ``--turns`` everyday messages in
one session, one after the other, and prints each turn's `llm_first_token`
(ms after the message arrived) and the ratio of the last five turns' median to
that of turns 2-6. A ratio near 1 means the history does not make later turns
slower (the prompt prefix stays cached as the history window slides).

Usage: python bench/conversation.py [--turns 30] [--url ws://...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import local_server  # noqa: E402

from avatalk.client import AvatalkClient  # noqa: E402

MESSAGES = [
    "Hi, I am planning a trip to Italy.",
    "What is the capital of Italy?",
    "What food is it famous for?",
    "How long is the flight from London?",
    "What should I pack for the spring?",
    "Is it expensive to eat out there?",
    "Which city should I visit first?",
    "What is a good day trip from Rome?",
    "Do I need to tip in restaurants?",
    "How do I say thank you in Italian?",
    "What is the weather like in April?",
    "Can you recommend a museum?",
    "How do trains work there?",
    "Is Venice worth a visit?",
    "What is a gondola?",
    "What time do shops close?",
    "Should I rent a car?",
    "What is the best gelato flavour?",
    "How many days do I need in Florence?",
    "What should I see in Milan?",
    "Is the tap water safe to drink?",
    "What currency do they use?",
    "Do they speak English in hotels?",
    "What is a typical breakfast?",
    "Where can I see the sea?",
    "What souvenirs are popular?",
    "How do I get from the airport to Rome?",
    "Is it safe to walk at night?",
    "What is one thing I must not miss?",
    "Thanks, that was very helpful.",
]


async def converse(url: str, turns: int) -> list[float]:
    firsts: list[float] = []
    async with AvatalkClient(url) as client:
        await client.wait_for(lambda e: e["type"] == "session.created")
        await client.configure(16000, 24000, greeting=False)
        for turn in range(turns):
            mark = len(client.events)
            await client.send_event("conversation.item.create", text=MESSAGES[turn % len(MESSAGES)])
            done = await client.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=120)
            first = (done.get("latency_ms") or {}).get("llm_first_token")
            firsts.append(float("nan") if first is None else float(first))
            print(f"turn {turn + 1:2d}: llm_first_token {first} ms ({done['status']})", flush=True)
    return firsts


def report(firsts: list[float]) -> None:
    early, late = firsts[1:6], firsts[-5:]
    early_median, late_median = statistics.median(early), statistics.median(late)
    print(f"turns 2-6 median {early_median:.1f} ms; last 5 median {late_median:.1f} ms; "
          f"ratio {late_median / early_median:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--turns", type=int, default=30)
    args = parser.parse_args()
    if args.turns < 10:
        parser.error("--turns must be at least 10 (turns 2-6 are compared with the last five)")
    if args.url:
        report(asyncio.run(converse(args.url, args.turns)))
    else:
        with local_server(args.port) as url:
            report(asyncio.run(converse(url, args.turns)))


if __name__ == "__main__":
    main()
