"""Settings sections of serving: limits, executors, avatars, MuseTalk, WebRTC, jobs, cluster and auth.

Part of :mod:`avatalk.config`, which assembles them into ``Settings`` and re-exports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator


class LimitSettings(BaseModel):
    # 4 fits 2 cores: at 8 video sessions a 2-core machine delivered 17.6-18.6 frames/s instead of 25
    # and first audio after 2.5-5.9 s; the load bench's 4 sessions is the measured design point.
    # Raise it with the cores (or a GPU renderer and a remote LLM).
    max_sessions: int = Field(4, ge=1, description="concurrent conversation sessions")
    max_text_frame_bytes: int = Field(64 * 1024, ge=1024)
    max_audio_frame_bytes: int = Field(256 * 1024, ge=1024, description="one binary audio frame")
    max_ws_message_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024, description="hard cap; larger closes the socket")
    max_text_input_chars: int = Field(2000, ge=1)
    queue_chunks: int = Field(64, ge=4, description="bound of every inter-stage queue")
    max_session_s: float = Field(3600.0, gt=0, description="a conversation is ended after this long")
    idle_timeout_s: float = Field(600.0, gt=0, description="a conversation with no user speech or text for this long ends")
    drain_s: float = Field(10.0, ge=0, description="on shutdown, replies in progress get this long to finish")
    jobs_per_minute: int = Field(10, ge=1, description="avatar/render jobs one key (or one open client) may create per minute")
    render_buffer_s: float = Field(
        5.0, ge=0.5, le=60.0, description="render sessions: most reply audio queued ahead of playback (more is refused)"
    )
    # 50 ms: one tick plus 10 ms of jitter for an agent sending at exactly real-time pace; a TTS
    # that runs ahead of real time fills it at once, so it costs nothing there.
    render_start_ms: int = Field(
        50, ge=40, le=1000, description="render sessions: audio an utterance holds before it starts playing"
    )


class ExecutorSettings(BaseModel):
    """Threads of each named pool (see ``avatalk.executors``)."""

    vad: int = Field(1, ge=1, le=64, description="voice activity detection (milliseconds per chunk)")
    turn: int = Field(1, ge=1, le=64, description="the smart-turn end-of-turn model (tens of milliseconds per pause)")
    asr: int = Field(1, ge=1, le=64, description="speech recognition; one model decodes faster alone on a small CPU")
    llm: int = Field(1, ge=1, le=64, description="in-process LLM generation loops (one per model decoding at once)")
    tts: int = Field(2, ge=1, le=64, description="speech synthesis and resampling of reply audio")
    render: int = Field(2, ge=1, le=64, description="lip-sync frames and idle frames")
    encode: int = Field(2, ge=1, le=64, description="JPEG encoding of frames for WebSocket clients")


class AvatarSettings(BaseModel):
    default_avatar: str = "ava"
    renderer: Literal["classic", "musetalk"] = "classic"
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    max_video_seconds: float = Field(20.0, gt=0)
    import_root: Path | None = Field(None, description="server-side folder that /v1/avatars/from-path may read")
    preparation_workers: int = Field(1, ge=1)
    output_size: int = Field(512, ge=64, le=2048, description="default video frame size (square)")
    jpeg_quality: int = Field(80, ge=10, le=100)


#: ``torch.compile`` modes offered; "reduce-overhead" captures CUDA graphs.
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]


class MuseTalkSettings(BaseModel):
    """How the MuseTalk renderer loads its weights and schedules the GPU."""

    models_dir: Path = Field(
        Path("models"), description="folder with musetalkV15/, sd-vae/ and whisper/ (the official layout)"
    )
    device: str = Field("auto", description="auto (CUDA when available), cuda, cuda:N or cpu")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto = float16 on CUDA, float32 on CPU"
    )
    max_batch: int = Field(16, ge=1, le=256, description="most frames in one UNet + VAE-decode batch")
    batch_window_ms: float = Field(
        2.0, ge=0.0, le=100.0, description="how long a batch that is not full waits for frames of other sessions"
    )
    frame_budget_ms: float = Field(
        34.0,
        gt=0.0,
        le=60000.0,
        description="render() returns the idle frame (a late frame) when its generated frame is not ready this long "
        "after the call; the clock calls it one 40 ms tick ahead, so this must stay below 40 ms",
    )
    look_ahead_ms: int = Field(
        1000, ge=0, le=10000, description="how far ahead of playback frames are generated when upcoming audio is known"
    )
    max_sessions: int = Field(
        16,
        ge=1,
        le=1024,
        description="most sessions the GPU draws at once; the sessions beyond are drawn by the classic renderer "
        "(a renderer_fallback warning, reason gpu_full)",
    )
    silence_db: float = Field(
        -55.0, le=0.0, description="ticks quieter than this (dBFS) show the idle frame and never reach the UNet"
    )
    compile: CompileMode = Field("off", description="torch.compile mode for UNet + decode; off = eager")
    channels_last: bool = Field(
        True, description="channels-last memory format for UNet and VAE on CUDA (faster convolutions)"
    )
    latents_batch: int = Field(16, ge=1, le=256, description="crops per VAE-encode batch when preparing latents")


class IceServer(BaseModel):
    """A STUN or TURN server handed to both peers."""

    urls: list[str] = Field(description='e.g. ["stun:stun.example.org:3478"] or ["turn:turn.example.org:3478?transport=udp"]')
    username: str | None = None
    credential: str | None = None


class WebRTCSettings(BaseModel):
    ice_servers: list[IceServer] = Field(
        default_factory=list,
        description="STUN/TURN servers; none by default (aiortc's public STUN default is never used)",
    )
    host_addresses: list[str] = Field(
        default_factory=list,
        description="addresses offered as host candidates (a public IP behind NAT; 127.0.0.1 for loopback-only); "
        "empty = the machine's interface addresses",
    )
    input_sample_rate: int = Field(48000, description="rate the decoded microphone audio is handed to the engine at")
    output_sample_rate: int = Field(48000, description="rate of the reply audio track (Opus runs at 48 kHz)")
    connect_timeout_s: float = Field(30.0, gt=0, description="a call not connected by then is hung up")
    max_viewers: int = Field(
        2, ge=0, le=16, description="WebRTC viewers one render session may have at once (each costs a VP8 encode)"
    )


class JobSettings(BaseModel):
    """Where background jobs (avatar preparation, renders) are kept, and how nodes share them."""

    database_url: str | None = Field(
        None,
        description="PostgreSQL URL shared by every node (postgresql://USER@HOST:PORT/DB; the password from "
        "PGPASSWORD or ~/.pgpass); empty = SQLite in data_dir, for one node only",
    )
    poll_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="how often a node looks for jobs queued through other nodes, for cancellations asked on "
        "other nodes and for jobs whose node died (PostgreSQL)",
    )

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("jobs.database_url must be a postgresql:// URL (or empty for SQLite on one node)")
        return value or None


class ClusterSettings(BaseModel):
    """This node's place among several behind a load balancer (docs/deployment.md, "Several nodes")."""

    node_id: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$",
        description="this node's name, the same as its HAProxy server name: session ids start with it so every "
        "request of a WebRTC call reaches the node that holds it; empty = one node (plain session ids)",
    )
    agent_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="TCP port answering HAProxy's agent-check with this node's free capacity as a weight "
        "(on the same address as the HTTP port); empty = off",
    )


class ApiKey(BaseModel):
    """A client's API key, stored as its SHA-256 (``avatalk keys hash KEY`` prints it)."""

    name: str = Field(min_length=1, max_length=64, description="who the key belongs to (logs, metrics, limits)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    max_sessions: int | None = Field(None, ge=1, description="concurrent sessions for this key (default: no own limit)")


class AuthSettings(BaseModel):
    api_keys: list[ApiKey] = Field(default_factory=list, description="empty = open access, allowed on loopback only")
    token_secret: str | None = Field(
        None, min_length=16, description="HMAC secret for session tokens; empty = random per process (tokens die on restart)"
    )
    token_ttl_s: int = Field(300, ge=10, le=86400, description="default lifetime of a session token")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed to call the API from a browser")
    allow_open_network: bool = Field(
        False, description="serve a non-loopback address without API keys (only for trusted private networks)"
    )
