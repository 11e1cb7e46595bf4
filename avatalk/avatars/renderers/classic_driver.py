"""Audio -> mouth pose for the classic renderer: loudness opens the mouth, the spectrum shapes the lips."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from avatalk.avatars.renderers.base import RENDER_SAMPLE_RATE, SAMPLES_PER_TICK

#: Speech level assumed before any audio is heard (TTS voices peak near -10 dBFS).
_NOMINAL_LEVEL_DB = -14.0
#: The speech level never adapts below this, so faint noise is not mistaken for speech.
_MIN_LEVEL_DB = -45.0
#: Ticks quieter than this are silence whatever the level (digital or near silence).
_SILENCE_DB = -55.0
#: Loudness below the speech level that still opens the mouth a little, and where it is fully open.
_CLOSED_BELOW_DB = 26.0
_OPEN_BELOW_DB = 5.0
#: Share of a louder tick's excess taken into the speech level at once, and share of a
#: quieter tick's deficit per tick (about 8 s to follow a voice that got quieter).
_LEVEL_RISE = 0.5
_LEVEL_FALL = 0.005
#: Part of the previous opening kept when the audio gets quieter (release): closing
#: takes two or three ticks, which reads as natural, while opening is immediate.
_RELEASE = 0.45
#: Openings below this are drawn as the closed source mouth (the gap would be under a pixel).
_MIN_OPENING = 0.04
#: Part of the previous lip shape kept each tick; the shape follows vowels, not noise.
_SHAPE_KEEP = 0.5
#: Close vowels ("ee", "oo") open the jaw this much less than open ones ("ah").
_CLOSE_VOWEL_DAMPING = 0.25


@dataclass(frozen=True, slots=True)
class MouthPose:
    """How the mouth looks for one tick.

    ``opening`` is 0 for the closed source mouth up to 1 for the widest
    speaking opening; ``shape`` is -1 for rounded lips ("oh", "oo"), 0 for
    neutral and +1 for spread lips ("ee", "s").
    """

    opening: float
    shape: float


class MouthDriver:
    """Turns each tick's audio into a ``MouthPose`` (the per-session audio state).

    Loudness is measured against a running speech level rather than full
    scale, so quiet and loud voices both use the whole range of openings.
    Two spectral cues shape the mouth, both as dB ratios of band energies
    (figures measured on the embedded piper voice):

    - openness, first-formant region (600-1100 Hz) over the region below it
      (150-500 Hz): about +3 dB for "ah", -29 dB for "ee"; close vowels open
      the jaw less;
    - frontness, front-vowel formants (1800-3600 Hz) over back-vowel ones
      (500-1500 Hz): about +15 dB for "ee" and "s", -19 dB for "oh", -25 dB
      for "ah"; front sounds spread the lips, back vowels that are not open
      round them.

    The opening attacks within the tick it is heard (it never lags the
    audio) and releases over a couple of ticks; the shape is smoothed too.
    """

    _level_db: float
    _opening: float
    _shape: float

    def __init__(self) -> None:
        freqs = np.fft.rfftfreq(SAMPLES_PER_TICK, 1.0 / RENDER_SAMPLE_RATE)
        self._window = np.hanning(SAMPLES_PER_TICK).astype(np.float32)

        def band(low: float, high: float) -> np.ndarray:
            return np.flatnonzero((freqs >= low) & (freqs < high))

        self._bands = (band(150, 500), band(600, 1100), band(500, 1500), band(1800, 3600))
        self.reset()

    def reset(self) -> None:
        """Back to the state of a new session: nominal speech level, mouth closed."""
        self._level_db = _NOMINAL_LEVEL_DB
        self._opening = 0.0
        self._shape = 0.0

    def step(self, audio: np.ndarray) -> MouthPose:
        """The pose for one tick of audio (``SAMPLES_PER_TICK`` float32 samples)."""
        power = float(np.mean(np.square(audio, dtype=np.float64)))
        level = 10.0 * math.log10(power + 1e-12)
        target, shape_target = 0.0, 0.0
        if level > _SILENCE_DB:
            if level > self._level_db:
                self._level_db += _LEVEL_RISE * (level - self._level_db)
            elif level > self._level_db - _CLOSED_BELOW_DB:
                self._level_db = max(_MIN_LEVEL_DB, self._level_db + _LEVEL_FALL * (level - self._level_db))
            relative = level - self._level_db
            target = clip01((relative + _CLOSED_BELOW_DB) / (_CLOSED_BELOW_DB - _OPEN_BELOW_DB))
        if target > 0.0:
            spectrum = np.abs(np.fft.rfft(audio * self._window)) ** 2
            below_f1, f1, back, front = (float(spectrum[band].sum()) + 1e-12 for band in self._bands)
            openness = 10.0 * math.log10(f1 / below_f1)
            frontness = 10.0 * math.log10(front / back)
            target *= 1.0 - _CLOSE_VOWEL_DAMPING * (1.0 - clip01((openness + 20.0) / 22.0))
            spread = clip01((frontness - 2.0) / 10.0)
            rounded = clip01((-frontness - 8.0) / 10.0) * (1.0 - clip01((openness + 4.0) / 10.0))
            shape_target = spread - rounded
        if target >= self._opening:
            self._opening = target
        else:
            self._opening = target + _RELEASE * (self._opening - target)
            if self._opening < _MIN_OPENING:
                self._opening = 0.0
        self._shape = shape_target + _SHAPE_KEEP * (self._shape - shape_target)
        return MouthPose(opening=self._opening if self._opening >= _MIN_OPENING else 0.0, shape=self._shape)


def clip01(value: float) -> float:
    return min(1.0, max(0.0, value))


def smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, smooth (zero slope at both ends) in between: seamless fades."""
    t: np.ndarray = np.clip(x, 0.0, 1.0)
    eased: np.ndarray = t * t * (3.0 - 2.0 * t)
    return eased
