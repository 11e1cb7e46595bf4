"""Typed messages passed between the stages of a conversation.

Audio inside the engine is always mono float32 in [-1, 1]; its sample rate
travels with it so no stage has to guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class AudioChunk:
    """A piece of mono audio."""

    samples: np.ndarray  # float32, shape (n,)
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(slots=True)
class Transcript:
    """What the user said so far (partial) or in the whole turn (final)."""

    text: str
    final: bool
    turn_id: int


@dataclass(slots=True)
class TextDelta:
    """A piece of reply text streamed from the LLM."""

    text: str
    turn_id: int


@dataclass(slots=True)
class SpeechAudio:
    """Synthesised reply audio for one sentence, at the session output rate."""

    text: str
    audio: AudioChunk
    turn_id: int


@dataclass(slots=True)
class Interrupt:
    """The user barged in: everything queued for ``turn_id`` must go."""

    turn_id: int
    reason: str = "barge_in"


@dataclass(slots=True)
class VideoFrame:
    """One rendered 40 ms frame (RGB uint8, HxWx3) for tick ``index``."""

    index: int
    image: np.ndarray
    speaking: bool = False
    meta: dict[str, object] = field(default_factory=dict)
