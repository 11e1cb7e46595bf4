"""Three avatalk nodes behind HAProxy, sharing PostgreSQL and one data folder: all real, on loopback.

The balancer runs the documented ``deploy/haproxy.cfg`` (addresses and
check timings moved to loopback); the nodes are ``avatalk serve``
processes, so SIGKILL and SIGTERM are real. Each node admits 2 sessions.
The LLM is the one test double (``FakeLLMServer``): three nodes on two
cores cannot each run a model, and the deployment is what is under test.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from cluster_parts import FakeLLMServer, HAProxy, Node, PostgresServer, agent_answer, require
from face_video import write_face_video
from fakes import free_port

from avatalk.client import AvatalkClient
from avatalk.jobs import NODE_LOST_MESSAGE

pytestmark = pytest.mark.slow

MAX_SESSIONS = 2
NAMES = ("node1", "node2", "node3")


class Cluster:
    """PostgreSQL, a fake LLM, three nodes on one shared data folder, and HAProxy in front."""

    def __init__(self, folder: Path) -> None:
        require("haproxy", "initdb", "postgres")
        self.folder = folder
        self.postgres = PostgresServer()
        self.database_url = self.postgres.create_database()
        self.llm = FakeLLMServer()
        self.data_dir = folder / "shared-data"
        settings = {
            "AVATALK_DATA_DIR": str(self.data_dir),
            "AVATALK_JOBS__DATABASE_URL": self.database_url,
            "AVATALK_JOBS__POLL_S": "0.3",
            "AVATALK_LIMITS__MAX_SESSIONS": str(MAX_SESSIONS),
            "AVATALK_LIMITS__DRAIN_S": "2",
            "AVATALK_LLM__BACKEND": "openai",
            "AVATALK_LLM__OPENAI__BASE_URL": self.llm.base_url,
            "AVATALK_LOG_LEVEL": "info",
        }
        self.nodes = {name: Node(name, folder / name, settings) for name in NAMES}
        for node in self.nodes.values():  # all at once, on a fresh shared folder, as a deployment starts
            node.start()
        for node in self.nodes.values():
            node.wait_ready()
        self.haproxy = HAProxy(folder / "haproxy", list(self.nodes.values()))
        self.wait_all_up()

    def wait_all_up(self) -> None:
        for node in self.nodes.values():
            if not node.alive:
                node.start()
                node.wait_ready()
        self.haproxy.wait_until(
            lambda servers: all(s["status"] == "UP" and s["weight"] != "0" for s in servers.values()),
            what="every node UP with a weight",
        )
        self.haproxy.wait_until(
            lambda servers: all(s["status"] == "UP" for s in servers.values()), what="every node UP", backend="avatalk"
        )

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        if not node.alive:
            node.start()
        node.wait_ready()
        self.wait_all_up()

    def sessions_per_node(self) -> dict[str, int]:
        return {name: httpx.get(f"{n.base_url}/readyz").json()["sessions"] for name, n in self.nodes.items() if n.alive}

    def stop(self) -> None:
        self.haproxy.stop()
        for node in self.nodes.values():
            node.stop()
        self.llm.stop()
        self.postgres.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    built = Cluster(tmp_path_factory.mktemp("cluster"))
    yield built
    built.stop()


def node_of(session_id: str) -> str:
    return session_id.split(".", 1)[0]


async def open_session(url: str) -> tuple[AvatalkClient, str]:
    client = AvatalkClient(url)
    await client.connect()
    created = await client.wait_for(lambda e: e["type"] == "session.created", timeout=30)
    configured = await client.configure(greeting=False)
    assert configured["type"] == "session.updated", configured
    return client, created["session"]["id"]


async def close_all(clients: list[AvatalkClient]) -> None:
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


async def wait_sessions(cluster: Cluster, expected: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum((await asyncio.to_thread(cluster.sessions_per_node)).values()) != expected:
        assert time.monotonic() < deadline, f"sessions per node: {cluster.sessions_per_node()}"
        await asyncio.sleep(0.1)


async def turn_completes(client: AvatalkClient, text: str = "What is two plus two?") -> dict:
    mark = len(client.events)
    await client.send_event("conversation.item.create", text=text)
    return await client.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=60)


async def offer_sdp() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


# --- Capacity -------------------------------------------------------------------------------


async def test_each_node_reports_its_readiness_and_free_capacity(cluster):
    async with httpx.AsyncClient() as http:
        for name, node in cluster.nodes.items():
            ready = await http.get(f"{node.base_url}/readyz")
            assert ready.status_code == 200
            body = ready.json()
            assert (body["status"], body["sessions"], body["max_sessions"], body["node"]) == ("ready", 0, MAX_SESSIONS, name)
            assert agent_answer(node.agent_port).startswith("ready up 100%")
        # The REST API and the page work through the balancer.
        assert (await http.get(f"{cluster.haproxy.base_url}/v1/avatars")).status_code == 200
        assert (await http.get(f"{cluster.haproxy.base_url}/")).status_code == 200
        assert "avatalk_sessions" in (await http.get(f"{cluster.haproxy.base_url}/metrics")).text


async def test_sessions_spread_evenly_and_a_full_deployment_refuses_clearly(cluster):
    clients: list[AvatalkClient] = []
    try:
        ids = []
        for _ in range(3 * MAX_SESSIONS):
            client, session_id = await open_session(cluster.haproxy.ws_url)
            clients.append(client)
            ids.append(session_id)
        per_node = Counter(node_of(session_id) for session_id in ids)
        assert per_node == {name: MAX_SESSIONS for name in NAMES}, per_node
        assert await asyncio.to_thread(cluster.sessions_per_node) == {name: MAX_SESSIONS for name in NAMES}
        async with httpx.AsyncClient() as http:
            for node in cluster.nodes.values():
                full = await http.get(f"{node.base_url}/readyz")
                assert full.status_code == 503 and full.json()["status"] == "full"
                assert agent_answer(node.agent_port).startswith("ready up 0%")
            await asyncio.to_thread(
                cluster.haproxy.wait_until,
                lambda servers: all(s["status"] == "DOWN" for s in servers.values()),
                what="every full node out of the pool",
            )
            # A new conversation: the balancer's own 503, in JSON, with Retry-After.
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(cluster.haproxy.ws_url, open_timeout=10)
            response = refused.value.response
            assert response.status_code == 503 and response.headers["Retry-After"] == "10"
            assert json.loads(response.body)["code"] == "server_full"
            pc, sdp = await offer_sdp()
            try:
                offer = await http.post(f"{cluster.haproxy.base_url}/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
            finally:
                await pc.close()
            assert offer.status_code == 503 and offer.json()["code"] == "server_full"
            # Only new sessions are refused: the API still answers through the balancer.
            assert (await http.get(f"{cluster.haproxy.base_url}/v1/avatars")).status_code == 200
            assert (await http.post(f"{cluster.haproxy.base_url}/v1/tokens", json={})).status_code != 503
            # The sessions already running are untouched: each still completes a turn.
            done = await asyncio.gather(*(turn_completes(client) for client in clients))
            assert [d["status"] for d in done] == ["completed"] * len(clients)
    finally:
        await close_all(clients)
    await wait_sessions(cluster, 0)
    await asyncio.to_thread(cluster.wait_all_up)


async def test_webrtc_calls_spread_by_weight_and_every_request_reaches_their_node(cluster):
    """WebRTC media bypasses the balancer, so only the agent's weights can spread calls; the session id routes."""
    peers: list[RTCPeerConnection] = []
    calls: list[str] = []
    fillers: list[AvatalkClient] = []
    try:
        async with httpx.AsyncClient(base_url=cluster.haproxy.base_url) as http:
            for _ in NAMES:
                pc, sdp = await offer_sdp()
                peers.append(pc)
                answer = await http.post("/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
                assert answer.status_code == 200, answer.text
                calls.append(answer.json()["session_id"])
                node = node_of(calls[-1])
                # Wait for the balancer to hear the node's lower weight before the next offer.
                await asyncio.to_thread(
                    cluster.haproxy.wait_until,
                    lambda servers, node=node: servers[node]["weight"] != "100",
                    what=f"{node}'s weight lowered by its call",
                )
            assert sorted(node_of(call) for call in calls) == list(NAMES)
            # Fill every node with a WebSocket session: all full, all out of the pool...
            for _ in NAMES:
                client, _session = await open_session(cluster.haproxy.ws_url)
                fillers.append(client)
            await asyncio.to_thread(
                cluster.haproxy.wait_until,
                lambda servers: all(s["status"] == "DOWN" for s in servers.values()),
                what="every full node out of the pool",
            )
            # ...and still each hang-up reaches the node that holds the call.
            for call in calls:
                hung_up = await http.delete(f"/v1/webrtc/{call}")
                assert hung_up.status_code == 204, (call, hung_up.text)
    finally:
        await close_all(fillers)
        for pc in peers:
            await pc.close()
    await wait_sessions(cluster, 0)
    await asyncio.to_thread(cluster.wait_all_up)


# --- Jobs and avatars on shared state ---------------------------------------------------------


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_face_video(tmp_path_factory.mktemp("inputs") / "face.mp4", seconds=6)


async def upload(http: httpx.AsyncClient, video: Path, avatar_id: str) -> str:
    with video.open("rb") as handle:
        response = await http.post(
            "/v1/avatars", data={"id": avatar_id}, files={"file": ("face.mp4", handle, "video/mp4")}
        )
    assert response.status_code == 202, response.text
    return response.json()["job"]["id"]


async def wait_job(http: httpx.AsyncClient, job_id: str, timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = (await http.get(f"/v1/jobs/{job_id}")).json()
        if job["state"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)


def runs_of(cluster: Cluster, job_id: str) -> list[str]:
    """The nodes whose log says they ran ``job_id``."""
    return [name for name, node in cluster.nodes.items() if f"running avatar job {job_id}" in node.log_text()]


async def test_an_avatar_is_prepared_once_seen_by_every_node_and_its_deletion_too(cluster, video):
    async with httpx.AsyncClient(base_url=cluster.haproxy.base_url, timeout=60) as http:
        job_id = await upload(http, video, "shared-face")
        job = await wait_job(http, job_id)
        assert job["state"] == "succeeded", job
        assert len(runs_of(cluster, job_id)) == 1  # run once, by one node
        listed = (await http.get("/v1/jobs", params={"avatar_id": "shared-face"})).json()["jobs"]
        assert [j["id"] for j in listed] == [job_id]
        clients = []
        try:
            for name, node in cluster.nodes.items():  # every node serves it (and caches it)
                assert (await http.get(f"{node.base_url}/v1/avatars/shared-face")).status_code == 200, name
                client = AvatalkClient(node.ws_url)
                await client.connect()
                await client.wait_for(lambda e: e["type"] == "session.created")
                described = await client.configure(avatar="shared-face", video_size=128, greeting=False)
                assert described["type"] == "session.updated" and described["session"]["avatar"] == "shared-face"
                clients.append(client)
        finally:
            await close_all(clients)
        assert (await http.delete("/v1/avatars/shared-face")).status_code == 204
        for name, node in cluster.nodes.items():  # gone on every node, cached or not
            assert (await http.get(f"{node.base_url}/v1/avatars/shared-face")).status_code == 404, name
            client = AvatalkClient(node.ws_url)
            await client.connect()
            try:
                await client.wait_for(lambda e: e["type"] == "session.created")
                answer = await client.configure(avatar="shared-face", video_size=128, greeting=False)
                assert answer["type"] == "error" and answer["code"] == "unknown_avatar", (name, answer)
            finally:
                await client.close()
    await wait_sessions(cluster, 0)


async def test_a_node_killed_during_preparation_loses_no_job(cluster, video):
    victim = None
    async with httpx.AsyncClient(base_url=cluster.haproxy.base_url, timeout=60) as http:
        jobs = [await upload(http, video, f"kill-{i}") for i in range(4)]
        try:
            with psycopg.connect(cluster.database_url, autocommit=True) as db:
                deadline = time.monotonic() + 120
                while victim is None:  # the node running the first job, caught while it runs
                    row = db.execute("SELECT state, node FROM avatalk_jobs WHERE id = %s", (jobs[0],)).fetchone()
                    assert row is not None and row[0] in ("queued", "running"), f"the job ended before the kill: {row}"
                    if row[0] == "running":
                        victim = row[1]
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
            cluster.nodes[victim].signal(signal.SIGKILL)
            await asyncio.to_thread(cluster.nodes[victim].wait_exit, 30)
            ended = [await wait_job(http, job_id) for job_id in jobs]
        finally:
            if victim is not None:
                await asyncio.to_thread(cluster.restart, victim)
    first, *others = ended
    assert first["state"] == "failed" and first["message"] == NODE_LOST_MESSAGE.format(node=victim), first
    for job in others:  # no job was lost or run twice: the others finished on the surviving nodes
        assert job["state"] == "succeeded", job
        ran_on = runs_of(cluster, job["id"])
        assert len(ran_on) == 1, (job["id"], ran_on)
    async with httpx.AsyncClient(base_url=cluster.haproxy.base_url, timeout=60) as http:
        for i in range(1, 4):
            assert (await http.delete(f"/v1/avatars/kill-{i}")).status_code == 204


# --- Losing a node ----------------------------------------------------------------------------


async def test_a_node_killed_ends_only_its_own_sessions(cluster):
    clients: list[tuple[AvatalkClient, str]] = []
    victim = None
    try:
        for _ in range(4):
            clients.append(await open_session(cluster.haproxy.ws_url))
        per_node = Counter(node_of(session_id) for _, session_id in clients)
        victim = per_node.most_common(1)[0][0]
        cluster.nodes[victim].signal(signal.SIGKILL)
        await asyncio.to_thread(cluster.nodes[victim].wait_exit, 30)
        theirs = [client for client, session_id in clients if node_of(session_id) == victim]
        ours = [client for client, session_id in clients if node_of(session_id) != victim]
        for client in theirs:
            await asyncio.wait_for(client.closed.wait(), 30)
        # Nothing of the other nodes' sessions notices: each completes a turn (0 failed turns).
        done = await asyncio.gather(*(turn_completes(client) for client in ours))
        assert [d["status"] for d in done] == ["completed"] * len(ours)
        assert all(not client.closed.is_set() for client in ours)
        # New sessions go to the surviving nodes.
        for _ in range(2 * MAX_SESSIONS - len(ours)):
            client, session_id = await open_session(cluster.haproxy.ws_url)
            clients.append((client, session_id))
            assert node_of(session_id) != victim
            assert (await turn_completes(client))["status"] == "completed"
    finally:
        await close_all([client for client, _ in clients])
        if victim is not None:
            await asyncio.to_thread(cluster.restart, victim)
    await wait_sessions(cluster, 0)


async def connected_call(base_url: str) -> tuple[RTCPeerConnection, list[dict], str]:
    """A WebRTC call answered by the node at ``base_url``, its data channel open; returns its events."""
    pc, _sdp = RTCPeerConnection(), None
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    channel = pc.createDataChannel("events")
    events: list[dict] = []
    channel.on("message", lambda message: events.append(json.loads(message)))
    opened = asyncio.Event()
    channel.on("open", opened.set)
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        answer = await http.post("/v1/webrtc/offer", json={"sdp": pc.localDescription.sdp, "type": "offer", "greeting": False})
    assert answer.status_code == 200, answer.text
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.json()["sdp"], type="answer"))
    await asyncio.wait_for(opened.wait(), 30)
    return pc, events, answer.json()["session_id"]


async def test_a_draining_node_leaves_the_pool_and_its_sessions_are_told(cluster):
    clients: list[tuple[AvatalkClient, str]] = []
    victim = None
    pc = None
    try:
        for _ in range(2):
            clients.append(await open_session(cluster.haproxy.ws_url))
        victim = node_of(clients[0][1])
        pc, call_events, call = await connected_call(cluster.nodes[victim].base_url)  # and a call on that node
        hung_up = asyncio.Event()

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("closed", "failed"):
                hung_up.set()

        cluster.nodes[victim].signal(signal.SIGTERM)
        theirs = [client for client, session_id in clients if node_of(session_id) == victim]
        for client in theirs:
            notice = await client.wait_for(lambda e: e["type"] == "error", timeout=30)
            assert notice["code"] == "server_shutdown"
            await asyncio.wait_for(client.closed.wait(), 30)
            assert client.close_code == 1012
        for _ in range(300):  # the call is told on its data channel too
            if any(e["type"] == "error" and e["code"] == "server_shutdown" for e in call_events):
                break
            await asyncio.sleep(0.1)
        assert [e["code"] for e in call_events if e["type"] == "error"] == ["server_shutdown"], (call, call_events)
        await asyncio.wait_for(hung_up.wait(), 60)  # then hung up
        await asyncio.to_thread(
            cluster.haproxy.wait_until,
            lambda servers: servers[victim]["status"] != "UP",
            what=f"{victim} out of the pool",
        )
        client, session_id = await open_session(cluster.haproxy.ws_url)
        clients.append((client, session_id))
        assert node_of(session_id) != victim
        assert await asyncio.to_thread(cluster.nodes[victim].wait_exit, 60) in (0, -signal.SIGTERM)
    finally:
        await close_all([client for client, _ in clients])
        if pc is not None:
            await pc.close()
        if victim is not None:
            await asyncio.to_thread(cluster.restart, victim)
    await wait_sessions(cluster, 0)


def test_the_documented_config_is_valid_haproxy(tmp_path):
    """``deploy/haproxy.cfg`` as shipped passes ``haproxy -c`` (only the TLS listener needs a real certificate)."""
    program = require("haproxy")["haproxy"]
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    text = (deploy / "haproxy.cfg").read_text()
    assert re.search(r"(?m)^\s*balance leastconn$", text) and "agent-check" in text and "uri /readyz" in text
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        re.sub(r"(?m)^(\s*bind) .*$", rf"\1 127.0.0.1:{free_port()}", text).replace("/etc/haproxy/errors/", f"{deploy}/errors/")
    )
    checked = subprocess.run([program, "-c", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
