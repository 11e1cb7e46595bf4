"""Recognise avatar inputs (videos and photos) by their leading bytes.

File names and declared content types are chosen by the sender and say
nothing reliable about the content, so uploads, server-side imports and the
CLI all look at the first bytes instead. Only formats that preparation can
read are recognised; anything else is rejected before a job is queued,
rather than failing minutes later inside FFmpeg.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: Bytes that ``sniff_media`` needs to see.
SNIFF_BYTES = 16

MediaKind = Literal["video", "image"]

# ISO base media ("ftyp") brands that hold still images, which FFmpeg does not
# decode as a photo: HEIF/HEIC and AVIF.
_STILL_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1", b"avif", b"avis"})
# First box types of QuickTime files written without an "ftyp" box.
_QUICKTIME_BOXES = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})


@dataclass(frozen=True)
class MediaType:
    """What a file's leading bytes say it is: ``kind`` and a short format name."""

    kind: MediaKind
    format: str


def sniff_media(head: bytes) -> MediaType | None:
    """The media type of a file from its first ``SNIFF_BYTES`` bytes, or ``None`` if unsupported.

    Videos: MP4/MOV (ISO base media), WebM/Matroska (EBML), AVI. Photos:
    JPEG, PNG, WebP, BMP.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return MediaType("image", "jpeg")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return MediaType("image", "png")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return MediaType("image", "webp")
    # "BM" alone starts plenty of text; the BMP header's reserved bytes are zero.
    if head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00":
        return MediaType("image", "bmp")
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return MediaType("video", "avi")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return MediaType("video", "webm/matroska")
    if head[4:8] == b"ftyp":
        if head[8:12] in _STILL_BRANDS:
            return None
        return MediaType("video", "quicktime" if head[8:12] == b"qt  " else "mp4")
    if head[4:8] in _QUICKTIME_BOXES:
        return MediaType("video", "quicktime")
    return None


def sniff_file(path: Path) -> MediaType | None:
    """``sniff_media`` on the beginning of a file (blocking I/O)."""
    with Path(path).open("rb") as handle:
        return sniff_media(handle.read(SNIFF_BYTES))
