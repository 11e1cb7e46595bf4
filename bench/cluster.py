"""Several avatalk nodes behind HAProxy on this machine: spread, balancer overhead, and losing a node.

Starts PostgreSQL (a temporary cluster), ``--nodes`` ``avatalk serve``
processes sharing it and one data folder, and HAProxy running
``deploy/haproxy.cfg`` on loopback (the launchers of tests/cluster_parts.py:
real parts, no test double; each node runs its default models). Then:

1. **Spread**: ``--sessions`` WebSocket conversations opened at once through
   the balancer; prints the sessions per node (target: counts differ by at
   most 1).
2. **Overhead**: the same number of conversations opened directly on the
   nodes (spread by hand); rounds of typed questions alternate between the
   balanced and the direct sessions, so both see the same load; prints
   first reply audio (client side: question sent -> first audio received)
   p50/p95 for each and the difference of the p50s (target: within 20 ms),
   then the balancer's own cost on a small request (GET /healthz) each way,
   which the models' noise on a small machine does not hide.
3. **Kill** (``--kill``): the balanced sessions keep asking while avatar
   preparations run; one node is SIGKILLed; prints failed turns on the
   surviving nodes (target 0), the killed node's sessions that ended, and
   jobs lost (target 0: each ends succeeded, or failed with a message
   naming the dead node; none stays queued or running).

Everything is bounded: each turn and each phase has a timeout, and every
process it started is stopped at the end.

Usage: python bench/cluster.py [--nodes 3] [--sessions 6] [--rounds 4] [--kill]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cluster_parts import HAProxy, Node, PostgresServer, face_video  # noqa: E402  (the launchers the tests use)

from avatalk.client import AvatalkClient  # noqa: E402

QUESTIONS = ("What is two plus two?", "Name a colour.", "Say hello.", "What day comes after Monday?")
TURN_TIMEOUT_S = 120.0
PHASE_TIMEOUT_S = 900.0


@dataclass
class Conversation:
    """One WebSocket conversation and what its turns measured."""

    client: AvatalkClient
    session_id: str
    balanced: bool
    first_audio_ms: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def node(self) -> str:
        return self.session_id.split(".", 1)[0]


async def open_conversation(url: str, balanced: bool) -> Conversation:
    client = AvatalkClient(url)
    await client.connect()
    created = await client.wait_for(lambda e: e["type"] == "session.created", timeout=60)
    configured = await client.configure(greeting=False)
    if configured["type"] != "session.updated":
        raise RuntimeError(f"session refused: {configured}")
    return Conversation(client, created["session"]["id"], balanced)


async def ask(conversation: Conversation, question: str) -> bool:
    """One typed turn; records first reply audio as the client saw it. False when the turn failed."""
    client = conversation.client
    mark, heard = len(client.events), len(client.audio)
    sent = time.monotonic()
    try:
        await client.send_event("conversation.item.create", text=question)
        done = await client.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=TURN_TIMEOUT_S)
    except (ConnectionError, TimeoutError, OSError):
        conversation.failed += 1
        return False
    if done["status"] != "completed" or len(client.audio) == heard:
        conversation.failed += 1
        return False
    conversation.first_audio_ms.append((client.audio[heard].received_at - sent) * 1000)
    return True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def describe(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5):.0f} ms, p95 {percentile(values, 0.95):.0f} ms (n={len(values)})"


class Deployment:
    """PostgreSQL + nodes on one shared data folder + HAProxy, in a temporary folder."""

    def __init__(self, folder: Path, nodes: int, max_sessions: int) -> None:
        self.postgres = PostgresServer()
        self.database_url = self.postgres.create_database()
        settings = {
            "AVATALK_DATA_DIR": str(folder / "shared-data"),
            "AVATALK_JOBS__DATABASE_URL": self.database_url,
            "AVATALK_LIMITS__MAX_SESSIONS": str(max_sessions),
            "AVATALK_LOG_LEVEL": "warning",
        }
        self.nodes = [Node(f"node{i + 1}", folder / f"node{i + 1}", settings) for i in range(nodes)]
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready(600)
        self.haproxy = HAProxy(folder / "haproxy", self.nodes)
        self.haproxy.wait_until(lambda servers: all(s["status"] == "UP" for s in servers.values()), 60)

    def stop(self) -> None:
        self.haproxy.stop()
        for node in self.nodes:
            node.stop()
        self.postgres.stop()


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="avatalk-bench-cluster-") as tmp:
        started = time.monotonic()
        deployment = Deployment(Path(tmp), args.nodes, args.max_sessions)
        print(f"{args.nodes} nodes and HAProxy ready in {time.monotonic() - started:.0f} s")
        conversations: list[Conversation] = []
        try:
            balanced = await asyncio.gather(
                *(open_conversation(deployment.haproxy.ws_url, True) for _ in range(args.sessions))
            )
            conversations.extend(balanced)
            spread = Counter(c.node for c in balanced)
            counts = [spread.get(node.name, 0) for node in deployment.nodes]
            print(f"\n1. spread of {args.sessions} sessions opened at once through HAProxy: "
                  + ", ".join(f"{node.name} {n}" for node, n in zip(deployment.nodes, counts, strict=True))
                  + f" (max - min = {max(counts) - min(counts)})")
            direct = [
                await open_conversation(deployment.nodes[i % len(deployment.nodes)].ws_url, False)
                for i in range(args.sessions)
            ]
            conversations.extend(direct)
            for round_index in range(args.rounds * 2):
                group = balanced if round_index % 2 == 0 else direct
                question = QUESTIONS[(round_index // 2) % len(QUESTIONS)]
                await asyncio.wait_for(asyncio.gather(*(ask(c, question) for c in group)), PHASE_TIMEOUT_S)
            through = [ms for c in balanced for ms in c.first_audio_ms]
            straight = [ms for c in direct for ms in c.first_audio_ms]
            print(f"\n2. first reply audio (question sent -> first audio received), {args.sessions} sessions each:")
            print(f"   through HAProxy: {describe(through)}; failed turns {sum(c.failed for c in balanced)}")
            print(f"   direct to nodes: {describe(straight)}; failed turns {sum(c.failed for c in direct)}")
            print(f"   balancer - direct (p50): {percentile(through, 0.5) - percentile(straight, 0.5):+.0f} ms")
            await http_round_trips(deployment, args.requests)
            for c in direct:
                await c.client.close()
            if args.kill:
                await kill_phase(deployment, balanced, args)
        finally:
            await asyncio.gather(*(c.client.close() for c in conversations), return_exceptions=True)
            deployment.stop()


async def http_round_trips(deployment: Deployment, count: int) -> None:
    """The balancer's own cost without the models' noise: one small request, through HAProxy and direct."""

    async def timed(base_url: str) -> list[float]:
        async with httpx.AsyncClient(base_url=base_url) as http:
            await http.get("/healthz")  # connection set up outside the timing, as a browser's is
            times = []
            for _ in range(count):
                began = time.perf_counter()
                (await http.get("/healthz")).raise_for_status()
                times.append((time.perf_counter() - began) * 1000)
            return times

    through = await timed(deployment.haproxy.base_url)
    straight = await timed(deployment.nodes[0].base_url)
    print(f"   GET /healthz x{count} on a kept-alive connection: through HAProxy p50 {percentile(through, 0.5):.2f} ms, "
          f"direct p50 {percentile(straight, 0.5):.2f} ms (+{percentile(through, 0.5) - percentile(straight, 0.5):.2f} ms)")


async def kill_phase(deployment: Deployment, balanced: list[Conversation], args: argparse.Namespace) -> None:
    """Turns keep going and preparations run while one node is killed."""
    victim = Counter(c.node for c in balanced).most_common(1)[0][0]
    video = face_video(Path(tempfile.mkdtemp(prefix="avatalk-bench-video-")) / "face.mp4", seconds=6)
    async with httpx.AsyncClient(base_url=deployment.haproxy.base_url, timeout=120) as http:
        jobs = []
        for i in range(args.jobs):
            with video.open("rb") as handle:
                accepted = await http.post(
                    "/v1/avatars", data={"id": f"bench-{i}"}, files={"file": ("face.mp4", handle, "video/mp4")}
                )
            jobs.append(accepted.json()["job"]["id"])
        for c in balanced:
            c.failed = 0
        stop_at = time.monotonic() + args.kill_seconds

        async def keep_asking(conversation: Conversation) -> None:
            index = 0
            while time.monotonic() < stop_at and not conversation.client.closed.is_set():
                await ask(conversation, QUESTIONS[index % len(QUESTIONS)])
                index += 1

        talking = asyncio.gather(*(keep_asking(c) for c in balanced))
        await asyncio.sleep(min(5.0, args.kill_seconds / 3))
        node = next(n for n in deployment.nodes if n.name == victim)
        node.signal(9)
        killed_at = time.monotonic()
        await asyncio.wait_for(talking, args.kill_seconds + TURN_TIMEOUT_S)
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        ended: list[dict] = []
        while time.monotonic() < deadline:
            ended = [(await http.get(f"/v1/jobs/{job_id}")).json() for job_id in jobs]
            if all(job["state"] not in ("queued", "running") for job in ended):
                break
            await asyncio.sleep(1.0)
    survivors = [c for c in balanced if c.node != victim]
    theirs = [c for c in balanced if c.node == victim]
    states = Counter(job["state"] for job in ended)
    lost = sum(1 for job in ended if job["state"] in ("queued", "running"))
    node_lost = sum(1 for job in ended if job["state"] == "failed" and victim in (job["message"] or ""))
    print(f"\n3. {victim} killed (SIGKILL) {time.monotonic() - killed_at:.0f} s before the end of the phase:")
    print(f"   failed turns on the surviving nodes: {sum(c.failed for c in survivors)} "
          f"of {sum(len(c.first_audio_ms) + c.failed for c in survivors)}")
    print(f"   sessions of {victim} that ended: {sum(c.client.closed.is_set() for c in theirs)} of {len(theirs)}")
    print(f"   jobs: {dict(states)}; failed because {victim} died: {node_lost}; lost: {lost}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=6, help="conversations through the balancer (and as many direct)")
    parser.add_argument("--max-sessions", type=int, default=4, help="each node's limits.max_sessions")
    parser.add_argument("--rounds", type=int, default=4, help="typed questions per conversation, per group")
    parser.add_argument("--requests", type=int, default=300, help="small HTTP requests timed each way")
    parser.add_argument("--kill", action="store_true", help="then kill a node under load (phase 3)")
    parser.add_argument("--jobs", type=int, default=4, help="avatar preparations running during the kill")
    parser.add_argument("--kill-seconds", type=float, default=30.0, help="length of the kill phase")
    args = parser.parse_args()
    if args.sessions * 2 > args.nodes * args.max_sessions:
        parser.error("--sessions * 2 must fit in --nodes * --max-sessions (balanced and direct sessions are open together)")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
