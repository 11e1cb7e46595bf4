"""Errors of avatar preparation, and the checks that raise them early."""

from __future__ import annotations

import threading

from avatalk.avatars.store import MAX_DISPLAY_NAME


class AvatarPreparationError(Exception):
    """The input cannot be made into an avatar; the message says why, for the user."""


class AvatarPreparationCancelled(AvatarPreparationError):
    """Preparation was stopped through its ``cancel`` event."""


def check_display_name(name: str) -> None:
    """Fail before any work rather than when the manifest is validated at the end."""
    if not name.strip() or len(name) > MAX_DISPLAY_NAME:
        raise AvatarPreparationError(f"the display name must be 1 to {MAX_DISPLAY_NAME} characters")


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise AvatarPreparationCancelled("avatar preparation was cancelled")

