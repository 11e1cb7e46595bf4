"""Command line: ``avatalk serve | talk`` (more commands arrive with the avatar issues)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

from avatalk.avatars.cli import app as avatar_app
from avatalk.config import Settings
from avatalk.doctor import doctor as doctor_command

app = typer.Typer(help="avatalk: a real-time talking-avatar conversation server.", no_args_is_help=True)
app.add_typer(avatar_app, name="avatar", help="Prepare, list and delete avatars.")


@app.command()
def serve(
    host: str | None = typer.Option(None, help="bind address (default: settings, AVATALK_HOST)"),
    port: int | None = typer.Option(None, help="port (default: settings, AVATALK_PORT)"),
) -> None:
    """Load the models and serve the API and the WebSocket; SIGTERM drains the sessions, then stops."""
    from avatalk.logs import configure_logging
    from avatalk.server.auth import check_exposure
    from avatalk.server.app import serve as serve_node

    settings = Settings()
    if host is not None:
        settings.host = host
    if port is not None:
        settings.port = port
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        check_exposure(settings)
    except RuntimeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    serve_node(settings)


@app.command()
def talk(
    wav: Path = typer.Option(..., exists=True, dir_okay=False, help="question to speak (16-bit PCM WAV)"),
    url: str = typer.Option("ws://127.0.0.1:8000/v1/ws", help="server WebSocket URL"),
    out: Path | None = typer.Option(None, help="write the reply audio here (WAV)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    greeting: bool = typer.Option(False, help="let the assistant greet first"),
    timeout: float = typer.Option(60.0, help="seconds to wait for the reply"),
    video_out: Path | None = typer.Option(None, help="also save the reply as an MP4 with the avatar's video"),
    avatar: str | None = typer.Option(None, help="avatar id for the video (default: the server's default)"),
    video_size: int | None = typer.Option(None, help="longer side of the video in pixels"),
) -> None:
    """Speak a WAV file to a running server at real-time pace and save the spoken reply."""
    from avatalk.client import talk as run_talk
    from avatalk.media.audio import write_wav

    try:
        result = asyncio.run(
            run_talk(
                url, wav, greeting=greeting, timeout=timeout, video_out=video_out, avatar=avatar, video_size=video_size
            )
        )
    except (OSError, ConnectionError, TimeoutError, RuntimeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1)
    if out is not None:
        write_wav(out, result.audio, result.sample_rate)
    if as_json:
        typer.echo(json.dumps(result.summary()))
    else:
        typer.echo(f"you said:  {result.transcript}")
        typer.echo(f"assistant: {result.reply}")
        typer.echo(f"audio: {result.audio_seconds:.2f} s, {result.frames} frames")
        typer.echo(f"latency (ms after end of speech): {result.latency_ms}")


@app.command()
def render(
    avatar: str = typer.Option(..., help="avatar id (see `avatalk avatar list`)"),
    out: Path = typer.Option(..., "-o", "--out", dir_okay=False, help="the MP4 to write"),
    text: str | None = typer.Option(None, help="a script for the avatar to speak"),
    audio: Path | None = typer.Option(None, exists=True, dir_okay=False, help="speech audio to lip-sync instead"),
    size: int | None = typer.Option(None, help="longer side of the video in pixels (default: settings)"),
) -> None:
    """Make a talking-avatar video from a script (spoken by the TTS) or an audio file."""
    from rich.progress import Progress

    from avatalk.avatars.default_face import ensure_default_avatar
    from avatalk.avatars.offline import RenderError, load_audio, render_video, synthesize_script
    from avatalk.avatars.prepare_settings import avatars_root
    from avatalk.avatars.renderers import create_renderer
    from avatalk.avatars.store import AvatarNotFound, AvatarStore, InvalidAvatarId
    from avatalk.executors import Executors
    from avatalk.tts import TTSError, create_tts

    settings = Settings()
    if (text is None) == (audio is None):
        typer.echo("error: give exactly one of --text or --audio", err=True)
        raise typer.Exit(2)
    root = avatars_root(settings)
    if avatar == settings.avatars.default_avatar:
        ensure_default_avatar(root, avatar)
    try:
        loaded = AvatarStore(root).load(avatar)
        if text is not None:
            executors = Executors.create(settings.executors)
            try:
                tts = create_tts(settings, executors)
                speech, rate = asyncio.run(synthesize_script(tts, text))
            finally:
                executors.shutdown()
        else:
            assert audio is not None
            speech, rate = load_audio(audio)
        with Progress() as bar:
            task = bar.add_task("rendering", total=1.0)
            result = render_video(
                create_renderer(settings.avatars.renderer, settings.musetalk),
                loaded,
                speech,
                rate,
                out,
                size or settings.avatars.output_size,
                progress=lambda fraction: bar.update(task, completed=fraction),
            )
    except (AvatarNotFound, InvalidAvatarId, RenderError, TTSError, ValueError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1)
    typer.echo(f"wrote {result.path} ({result.frames} frames, {result.seconds:.1f} s)")


app.command("doctor")(doctor_command)


@app.command("hash-key")
def hash_key_command(key: str = typer.Argument(..., help="the API key to hash")) -> None:
    """Print the SHA-256 to put in auth.api_keys (the key itself is never stored)."""
    from avatalk.server.auth import hash_key

    typer.echo(hash_key(key))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
