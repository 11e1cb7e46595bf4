"""Answer quality of the configured LLM: everyday typed questions over the real WebSocket, scored by keywords.

Starts `avatalk serve` in a subprocess (or uses --url) and holds a few short
conversations at once, typing each question (``conversation.item.create``) and
waiting for the whole reply before the next one, so follow-up questions see the
history exactly as a user's would. A reply is right when it contains one of the
accepted answers of every keyword group, none of the rejected words, and, for a
question in English, reads as English. Questions are facts, arithmetic,
follow-ups that need the history and short instructions; none of them appears
in the persona's built-in example exchanges (``avatalk.llm.persona``).

Prints each wrong reply and the score; ``--json`` prints everything.

Usage: python bench/quality.py [--url ws://...] [--parallel 4] [--show-all] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass, field

from latency import local_server  # bench/ is this script's folder, so on its path

from avatalk.client import AvatalkClient

#: Common words per language, to tell what language a reply is in.
LANGUAGE_WORDS: dict[str, set[str]] = {
    "en": {"the", "is", "are", "a", "an", "of", "and", "to", "in", "it", "you", "that", "i", "your", "this", "was",
           "there", "has", "have", "with", "for", "on", "my", "what", "can", "be", "they", "we", "do", "its", "it's"},
    "fr": {"le", "la", "les", "est", "et", "un", "une", "des", "du", "de", "je", "vous", "que", "qui", "pas", "c'est",
           "sont", "dans", "pour", "avec", "il", "elle", "nous", "au", "aux", "ce", "cette"},
    "it": {"il", "lo", "la", "gli", "le", "è", "e", "di", "che", "un", "una", "sono", "della", "del", "per", "con",
           "non", "questo", "anche", "ciao", "io", "tu"},
    "es": {"el", "la", "los", "las", "es", "y", "un", "una", "de", "que", "en", "por", "con", "para", "son", "del",
           "yo", "tu", "usted", "está", "hola"},
    "de": {"der", "die", "das", "ist", "und", "ein", "eine", "nicht", "ich", "du", "sie", "mit", "für", "auf", "den",
           "dem", "es", "sind"},
}


@dataclass(frozen=True)
class Question:
    """One typed question: every group in ``expect`` must match (any of its words), nothing in ``reject`` may."""

    text: str
    expect: tuple[tuple[str, ...], ...]
    reject: tuple[str, ...] = ()
    language: str | None = "en"  # the language the reply must be in; None: not checked (a translation)


def q(text: str, *expect: str | tuple[str, ...], reject: tuple[str, ...] = (), language: str | None = "en") -> Question:
    groups = tuple((group,) if isinstance(group, str) else group for group in expect)
    return Question(text, groups, reject, language)


#: Conversations: each is one session, its questions asked in order (later ones may need the earlier ones).
CONVERSATIONS: list[list[Question]] = [
    [
        q("What is the capital of France?", "paris"),
        q("And what is the capital of Italy?", "rome"),
        q("What language do people speak there?", "italian"),
        q("How many days are in a week?", ("seven", "7")),
    ],
    [
        q("What is two plus three?", ("five", "5"), reject=("mix",)),
        q("What is ten minus four?", ("six", "6")),
        q("What is three times four?", ("twelve", "12")),
        q("And if you add one to that?", ("thirteen", "13")),
        q("What is half of twenty?", ("ten", "10")),
    ],
    [
        q("Which planet do we live on?", "earth", reject=("mars",)),
        q("What is the largest planet in our solar system?", "jupiter"),
        q("What colour is the sky on a clear day?", "blue"),
        q("At what temperature does water boil, in degrees Celsius?", ("100", "hundred")),
        q("What do bees make?", "honey"),
    ],
    [
        q("How do you say thank you in French?", "merci", language=None),
        q("And how do you say hello in Spanish?", "hola", language=None),
        q("Count from one to five.", ("1", "one"), ("2", "two"), ("3", "three"), ("4", "four"), ("5", "five")),
        q("Name a fruit that is yellow.", ("banana", "bananas", "lemon", "lemons", "pineapple", "mango")),
        q("Quelle est la capitale de l'Espagne ?", "madrid", language="fr"),
    ],
    [
        q("My name is Sam and I have two dogs. What is my name?", "sam"),
        q("How many dogs do I have?", ("two", "2")),
        q("What sound does a dog make?", ("woof", "bark", "barks", "barking", "arf")),
    ],
    [
        q("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
        q("How many minutes are in an hour?", ("60", "sixty")),
        q("What is the opposite of hot?", "cold"),
        q("What do you call a baby cat?", ("kitten", "kitty")),
        q("What is frozen water called?", "ice"),
    ],
    [
        q("Who wrote Romeo and Juliet?", "shakespeare"),
        q("What is the tallest mountain in the world?", "everest"),
        q("Which ocean is the largest?", "pacific"),
        q("What country is Tokyo in?", "japan"),
        q("What currency do they use there?", "yen"),
    ],
    [
        q("Answer with one word: what colour is grass?", "green"),
        q("Give me a synonym for happy.", ("glad", "joyful", "cheerful", "content", "pleased", "delighted", "joyous")),
        q("What is the plural of mouse?", "mice"),
        q("What day comes after Monday?", "tuesday"),
        q("What month comes after June?", "july"),
    ],
    [
        q("I'm going to London next week. Which country is that in?",
          ("england", "united kingdom", "uk", "britain", "great britain")),
        q("What river runs through it?", "thames"),
        q("What language will I need there?", "english"),
        q("Remind me, which city am I visiting?", "london"),
    ],
    [
        q("How many legs does a spider have?", ("eight", "8")),
        q("What gas do plants take in from the air?", ("carbon dioxide", "co2")),
        q("Who was the first person to walk on the moon?", "armstrong"),
        q("How many continents are there?", ("seven", "7")),
        q("What is the freezing point of water in Celsius?", ("0", "zero")),
    ],
]


def words(text: str) -> list[str]:
    return re.findall(r"[\w'’-]+", text.lower())


def reply_language(text: str) -> str | None:
    """The language whose common words the reply uses most; None for replies too short to tell."""
    tokens = words(text)
    if len(tokens) < 4:
        return None
    hits = {language: sum(token in common for token in tokens) for language, common in LANGUAGE_WORDS.items()}
    best = max(hits, key=lambda language: hits[language])
    return best if hits[best] else None


def contains(text: str, keyword: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(keyword)}(?![\w-])", text.lower()) is not None


def judge(question: Question, reply: str) -> str | None:
    """Why the reply is wrong, or None when it is right."""
    if not reply.strip():
        return "no reply"
    for group in question.expect:
        if not any(contains(reply, keyword) for keyword in group):
            return f"missing {' | '.join(group)}"
    for keyword in question.reject:
        if contains(reply, keyword):
            return f"says {keyword!r}"
    if question.language is not None:
        language = reply_language(reply)
        if language is not None and language != question.language:
            return f"answered in {language}"
    return None


@dataclass
class Result:
    question: Question
    reply: str
    status: str
    seconds: float
    verdict: str | None = field(default=None)


async def converse(url: str, questions: list[Question], timeout: float) -> list[Result]:
    results: list[Result] = []
    async with AvatalkClient(url) as client:
        await client.wait_for(lambda e: e["type"] == "session.created")
        configured = await client.configure(16000, 16000, greeting=False)
        if configured["type"] == "error":
            raise RuntimeError(f"server refused the session: {configured['message']}")
        for question in questions:
            mark = len(client.events)
            started = time.monotonic()
            await client.send_event("conversation.item.create", text=question.text)
            created = await client.wait_for(lambda e: e["type"] == "response.created", since=mark, timeout=timeout)
            turn = created["turn_id"]
            done = await client.wait_for(
                lambda e, turn=turn: e["type"] == "response.done" and e["turn_id"] == turn, since=mark, timeout=timeout
            )
            text_done = [e for e in client.events[mark:] if e["type"] == "response.text.done" and e["turn_id"] == turn]
            reply = text_done[0]["text"] if text_done else done.get("text", "")
            result = Result(question, reply, done["status"], time.monotonic() - started)
            result.verdict = judge(question, reply) if done["status"] == "completed" else f"turn {done['status']}"
            results.append(result)
    return results


async def run(url: str, parallel: int, timeout: float) -> list[Result]:
    gate = asyncio.Semaphore(parallel)

    async def one(questions: list[Question]) -> list[Result]:
        async with gate:
            return await converse(url, questions, timeout)

    per_conversation = await asyncio.gather(*(one(questions) for questions in CONVERSATIONS))
    return [result for results in per_conversation for result in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--parallel", type=int, default=4, help="conversations held at once (<= limits.max_sessions)")
    parser.add_argument("--timeout", type=float, default=120.0, help="longest wait for one reply, in seconds")
    parser.add_argument("--show-all", action="store_true", help="print every reply, not only the wrong ones")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server(args.port))
        results = asyncio.run(run(url, args.parallel, args.timeout))

    right = sum(result.verdict is None for result in results)
    if args.json:
        print(json.dumps({
            "right": right,
            "total": len(results),
            "score": round(right / len(results), 3),
            "results": [
                {"question": r.question.text, "reply": r.reply, "status": r.status, "verdict": r.verdict,
                 "seconds": round(r.seconds, 2)}
                for r in results
            ],
        }, indent=2, ensure_ascii=False))
        return
    for result in results:
        if result.verdict is not None or args.show_all:
            mark = "ok " if result.verdict is None else "BAD"
            why = f"  [{result.verdict}]" if result.verdict else ""
            print(f"{mark} {result.question.text}\n    -> {result.reply.strip()!r}{why}")
    print(f"score: {right}/{len(results)} right ({100.0 * right / len(results):.0f} %)")
    sys.exit(0)


if __name__ == "__main__":
    main()
