"""Settings sections of the conversation pipeline: VAD, turns, ASR, LLM, TTS and persona.

Part of :mod:`avatalk.config`, which assembles them into ``Settings`` and re-exports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator


class VADSettings(BaseModel):
    model_path: Path | None = Field(None, description="silero VAD ONNX file; empty = the one silero-vad ships")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="speech probability that starts speech")
    negative_threshold: float = Field(0.35, ge=0.0, le=1.0, description="probability below which a window is silence")
    preroll_ms: int = Field(320, ge=0, le=2000, description="audio kept before speech onset")


class TurnSettings(BaseModel):
    end_silence_ms: int = Field(
        500, ge=100, le=5000,
        description="silence that ends a turn (semantic mode: when the model says incomplete but the words end a sentence)",
    )
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
    prefill_ahead: bool = Field(
        True,
        description="cache the next turn's prompt while a reply plays and each partial transcript's while the user "
        "speaks, so a reply only prefills the last words (llama-server; other backends ignore it)",
    )
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
    # 40: piper takes ~4 ms a character on one core here, so a 60-character first sentence kept the
    # reply's first audio ~100 ms later than a 40-character piece (cut at a clause, else a space).
    first_chunk_chars: int = Field(
        40, ge=20, description="the reply's first piece is cut sooner (at a clause) so speech starts sooner"
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
