"""``avatalk avatar create | list | delete``: manage avatars on this machine, without a server.

``create`` runs the same preparation as the server's jobs
(``prepare_with_settings``: same limits and frame size) directly in this
process, into ``<data_dir>/avatars`` of the current settings, so an avatar
can be prepared ahead of deployment or on a machine with more cores. A
running server sees the new avatar on its next listing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from avatalk.avatars.prepare_errors import AvatarPreparationError
from avatalk.avatars.prepare_settings import avatar_progress, avatars_root, prepare_with_settings
from avatalk.avatars.store import AvatarNotFound, AvatarStore, InvalidAvatarId, validate_avatar_id
from avatalk.config import Settings
from avatalk.media.sniff import sniff_file

app = typer.Typer(name="avatar", help="Create, list and delete prepared avatars.", no_args_is_help=True)

_STAGE_LABELS = {
    "analysing": "Finding the face",
    "writing": "Writing frames",
    "finishing": "Masks and manifest",
    "done": "Done",
}


def _fail(console: Console, message: str, code: int = 1) -> typer.Exit:
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    return typer.Exit(code)


@app.command()
def create(
    avatar_id: str = typer.Option(..., "--id", help="new avatar id: a-z, 0-9, '-', '_' (at most 64)"),
    video: Path | None = typer.Option(None, "--video", help="a video of the face (mp4, mov, webm, mkv, avi)"),
    image: Path | None = typer.Option(None, "--image", help="a photo of the face (jpeg, png, webp, bmp)"),
    name: str | None = typer.Option(None, "--name", help="display name (default: the id)"),
) -> None:
    """Prepare an avatar from a video or a photo."""
    errors = Console(stderr=True)
    if (video is None) == (image is None):
        raise _fail(errors, "give exactly one of --video or --image", 2)
    source = video if video is not None else image
    assert source is not None
    kind: Literal["video", "image"] = "video" if video is not None else "image"
    try:
        validate_avatar_id(avatar_id)
    except InvalidAvatarId as error:
        raise _fail(errors, str(error), 2) from None
    if not source.is_file():
        raise _fail(errors, f"{source} does not exist or is not a file")
    media = sniff_file(source)
    if media is None:
        raise _fail(
            errors, f"{source} is not a supported video (mp4, mov, webm, mkv, avi) or photo (jpeg, png, webp, bmp)"
        )
    if media.kind != kind:
        raise _fail(errors, f"{source} is a {media.format} {media.kind}; use --{media.kind}")

    settings = Settings()
    with Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("Reading", total=1.0)

        def report(stage: str, fraction: float) -> None:
            label = _STAGE_LABELS.get(stage, stage)
            progress.update(task, description=label, completed=avatar_progress(stage, fraction))

        try:
            manifest = prepare_with_settings(settings, source, avatar_id, name or avatar_id, kind=kind, progress=report)
        except AvatarPreparationError as error:
            raise _fail(errors, str(error)) from None
        except KeyboardInterrupt:  # preparation removes its partial folder on the way out
            raise _fail(errors, "cancelled; nothing was written", 130) from None
    typer.echo(
        f"created avatar {manifest.id!r} ({manifest.display_name}): {manifest.frame_count} frames of "
        f"{manifest.width}x{manifest.height} at {manifest.fps} fps in {avatars_root(settings)}"
    )
    if manifest.source.truncated:
        typer.echo(f"note: the video was cut to {settings.avatars.max_video_seconds:g} s (avatars.max_video_seconds)")


@app.command("list")
def list_avatars() -> None:
    """Show the prepared avatars."""
    root = avatars_root(Settings())
    manifests = AvatarStore(root).list()
    if not manifests:
        typer.echo(f"no avatars in {root}")
        return
    table = Table("id", "name", "frames", "fps", "size", "seconds", "source", "created (UTC)")
    for manifest in manifests:
        table.add_row(
            manifest.id,
            manifest.display_name,
            str(manifest.frame_count),
            str(manifest.fps),
            f"{manifest.width}x{manifest.height}",
            f"{manifest.frame_count / manifest.fps:.1f}",
            manifest.source.kind,
            manifest.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    Console().print(table)


@app.command()
def delete(avatar_id: str = typer.Argument(..., help="id of the avatar to delete")) -> None:
    """Delete an avatar and its files."""
    errors = Console(stderr=True)
    try:
        AvatarStore(avatars_root(Settings())).delete(avatar_id)
    except InvalidAvatarId as error:
        raise _fail(errors, str(error), 2) from None
    except AvatarNotFound as error:
        raise _fail(errors, str(error)) from None
    typer.echo(f"deleted avatar {avatar_id!r}")


@app.command("add-latents")
def add_latents(
    avatar_ids: list[str] = typer.Argument(..., help="avatars to prepare for MuseTalk"),
    force: bool = typer.Option(False, help="recompute even when valid latents exist"),
) -> None:
    """Store MuseTalk VAE latents in prepared avatars (needs the MuseTalk weights; see docs/avatars.md)."""
    try:
        from avatalk.avatars.renderers.musetalk.latents import add_latents as compute
        from avatalk.avatars.renderers.musetalk.loader import MuseTalkWeightsError
    except ImportError as error:
        typer.echo(f"error: the MuseTalk renderer needs torch, diffusers and transformers: {error}", err=True)
        raise typer.Exit(1) from error
    try:
        outcome = compute(Settings(), avatar_ids, force)
    except MuseTalkWeightsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error
    failed = False
    for avatar_id, result in outcome.items():
        if isinstance(result, str):
            typer.echo(f"error: {avatar_id}: {result}", err=True)
            failed = True
        else:
            typer.echo(f"{avatar_id}: latents of {result.frame_count} frames ready")
    raise typer.Exit(1 if failed else 0)
