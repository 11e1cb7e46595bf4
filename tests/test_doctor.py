"""``avatalk doctor``: the checks pass on a good install and explain what is wrong on a bad one."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from avatalk import doctor as doctor_module
from avatalk.config import Settings
from avatalk.doctor import CHECKS_BY_NAME, CheckResult, run_check, run_checks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def good_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", host="127.0.0.1", port=free_port())


@pytest.mark.slow
def test_every_required_check_passes_on_this_install(good_settings: Settings) -> None:
    results = run_checks(good_settings)
    names = [result.name for result in results]
    for name in ("vad", "asr", "llm", "tts", "face_models", "renderer", "gpu", "default_avatar", "data_dir", "port"):
        assert name in names
    assert "musetalk_weights" not in names  # only with the musetalk renderer
    failed = [result for result in results if result.required and not result.ok]
    assert failed == []
    assert all(result.detail for result in results)


def test_a_missing_model_file_fails_with_the_setting_to_fix(good_settings: Settings, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "vad.onnx"
    settings = good_settings.model_copy(update={"vad": good_settings.vad.model_copy(update={"model_path": missing})})
    result = run_check(CHECKS_BY_NAME["vad"], settings)
    assert not result.ok and result.required
    assert str(missing) in result.detail and "does not exist" in result.detail
    assert result.hint is not None and "AVATALK_VAD__MODEL_PATH" in result.hint


def _with_model_path(settings: Settings, section: str, path: Path) -> Settings:
    """``settings`` with ``model_path`` of the (dotted) ``section`` replaced."""
    first, *rest = section.split(".")
    if not rest:
        return settings.model_copy(update={first: getattr(settings, first).model_copy(update={"model_path": path})})
    outer = getattr(settings, first)
    inner = getattr(outer, rest[0]).model_copy(update={"model_path": path})
    return settings.model_copy(update={first: outer.model_copy(update={rest[0]: inner})})


@pytest.mark.parametrize(
    ("check", "section", "file_name", "setting"),
    [
        ("vad", "vad", "vad.onnx", "AVATALK_VAD__MODEL_PATH"),
        ("llm", "llm.llama_server", "model.gguf", "AVATALK_LLM__LLAMA_SERVER__MODEL_PATH"),
    ],
)
def test_a_file_that_is_not_a_model_fails_to_load(
    good_settings: Settings, tmp_path: Path, check: str, section: str, file_name: str, setting: str
) -> None:
    bogus = tmp_path / file_name
    bogus.write_bytes(b"this is not a model file" * 10)
    result = run_check(CHECKS_BY_NAME[check], _with_model_path(good_settings, section, bogus))
    assert not result.ok
    assert str(bogus) in result.detail
    assert result.hint is not None and setting in result.hint


def test_an_asr_folder_without_model_bin_fails(good_settings: Settings, tmp_path: Path) -> None:
    asr = good_settings.asr.model_copy(update={"model_path": tmp_path})
    result = run_check(CHECKS_BY_NAME["asr"], good_settings.model_copy(update={"asr": asr}))
    assert not result.ok and "model.bin" in result.detail
    assert result.hint is not None and "AVATALK_ASR__MODEL_PATH" in result.hint


def test_a_taken_port_is_reported(good_settings: Settings) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run_check(CHECKS_BY_NAME["port"], good_settings.model_copy(update={"port": port}))
    assert not result.ok and result.required
    assert f"127.0.0.1:{port} is already in use" in result.detail
    assert result.hint is not None and "AVATALK_PORT" in result.hint
    assert run_check(CHECKS_BY_NAME["port"], good_settings.model_copy(update={"port": port})).ok  # free again


def test_data_dir_that_is_a_file_fails(good_settings: Settings, tmp_path: Path) -> None:
    blocker = tmp_path / "data-file"
    blocker.write_text("not a folder")
    result = run_check(CHECKS_BY_NAME["data_dir"], good_settings.model_copy(update={"data_dir": blocker}))
    assert not result.ok and "is not a folder" in result.detail


def test_a_missing_custom_default_avatar_fails(good_settings: Settings) -> None:
    avatars = good_settings.avatars.model_copy(update={"default_avatar": "tutor"})
    result = run_check(CHECKS_BY_NAME["default_avatar"], good_settings.model_copy(update={"avatars": avatars}))
    assert not result.ok and "'tutor'" in result.detail
    assert result.hint is not None and "avatalk avatar create --id tutor" in result.hint


class _ModelsHandler(BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible server that lists one model."""

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "llama3.2:3b", "object": "model"}]}).encode()
        status = 200 if self.path == "/v1/models" else 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test output is not the place for access logs."""


@pytest.fixture
def openai_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ModelsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _openai(settings: Settings, base_url: str, model: str = "default") -> Settings:
    server = settings.llm.openai.model_copy(update={"base_url": base_url, "model": model})
    llm = settings.llm.model_copy(update={"backend": "openai", "openai": server})
    return settings.model_copy(update={"llm": llm})


def test_an_unreachable_openai_server_is_reported(good_settings: Settings) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = run_check(CHECKS_BY_NAME["llm"], _openai(good_settings, url))
    assert not result.ok
    assert f"{url}/models is unreachable: connection refused" in result.detail
    assert result.hint is not None and "AVATALK_LLM__OPENAI__BASE_URL" in result.hint


def test_a_reachable_openai_server_lists_its_models(good_settings: Settings, openai_server: str) -> None:
    listed = run_check(CHECKS_BY_NAME["llm"], _openai(good_settings, openai_server, "llama3.2:3b"))
    assert listed.ok and "llama3.2:3b" in listed.detail and listed.hint is None
    other = run_check(CHECKS_BY_NAME["llm"], _openai(good_settings, openai_server, "gpt-x"))
    assert other.ok and other.hint is not None and "AVATALK_LLM__OPENAI__MODEL" in other.hint
    wrong_root = run_check(CHECKS_BY_NAME["llm"], _openai(good_settings, openai_server.removesuffix("/v1")))
    assert not wrong_root.ok and "HTTP 404" in wrong_root.detail


def test_a_crashing_check_is_reported_not_raised(good_settings: Settings) -> None:
    def explode(settings: Settings) -> doctor_module.Passed:
        raise RuntimeError("boom")

    result = run_check(doctor_module.Check("explodes", explode), good_settings)
    assert not result.ok and "RuntimeError: boom" in result.detail


@pytest.mark.parametrize(
    ("results", "exit_code"),
    [
        ([CheckResult("port", False, "127.0.0.1:8000 is already in use", "set AVATALK_PORT")], 1),
        ([CheckResult("port", True, "free"), CheckResult("chromium", False, "not found", "make browser", False)], 0),
    ],
)
def test_the_command_exits_1_only_when_a_required_check_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, results: list[CheckResult], exit_code: int
) -> None:
    monkeypatch.setattr(doctor_module, "run_checks", lambda settings: results)
    monkeypatch.chdir(tmp_path)  # no avatalk.toml from the working tree
    app = typer.Typer()
    app.command()(doctor_module.doctor)
    outcome = CliRunner().invoke(app, [])
    assert outcome.exit_code == exit_code, outcome.output
    for result in results:
        assert result.name in outcome.output and result.detail in outcome.output
