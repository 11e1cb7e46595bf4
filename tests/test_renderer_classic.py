"""The classic renderer on the drawn default avatar and on a photo avatar, driven by piper speech.

Mouth opening is measured on the output frames themselves: how much darker
the mouth region (between the inner lip corners, from just above the lip line
to well below it, from the avatar's landmarks) is than in the avatar's own
frame, which is what a viewer sees as an open mouth.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest

from avatalk.avatars import landmarks as mesh
from avatalk.avatars.default_face import ensure_default_avatar
from avatalk.avatars.renderers import (
    RENDER_SAMPLE_RATE,
    SAMPLES_PER_TICK,
    ClassicRenderer,
    MouthDriver,
    create_renderer,
    output_shape_for,
)
from avatalk.avatars.store import AvatarStore, LoadedAvatar

SENTENCE = "Hello there, I am happy to talk with you today about the weather and the news."
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> AvatarStore:
    root = tmp_path_factory.mktemp("avatars")
    ensure_default_avatar(root, "ava", seconds=2.0)
    return AvatarStore(root)


@pytest.fixture(scope="module")
def default_avatar(store: AvatarStore) -> LoadedAvatar:
    return store.load("ava")


@pytest.fixture(scope="module")
def photo_avatar(store: AvatarStore, tmp_path_factory: pytest.TempPathFactory) -> LoadedAvatar:
    """The scikit-image astronaut as a photo avatar (prepared here, never committed)."""
    skimage_data = pytest.importorskip("skimage.data")
    from avatalk.avatars.prepare import prepare_avatar

    photo = tmp_path_factory.mktemp("photo") / "astronaut.png"
    cv2.imwrite(str(photo), cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR))
    prepare_avatar(photo, "astro", "Astronaut", store.root, still_seconds=1.0)
    return store.load("astro")


@pytest.fixture(params=["default", "photo"])
def avatar(request: pytest.FixtureRequest) -> LoadedAvatar:
    name = "default_avatar" if request.param == "default" else "photo_avatar"
    loaded: LoadedAvatar = request.getfixturevalue(name)
    return loaded


@pytest.fixture(scope="module")
def sentence(speech: Callable[..., np.ndarray]) -> np.ndarray:
    """A spoken sentence at 16 kHz, cut to whole ticks."""
    audio = speech(SENTENCE, RENDER_SAMPLE_RATE)
    return audio[: len(audio) // SAMPLES_PER_TICK * SAMPLES_PER_TICK]


def ticks(audio: np.ndarray) -> list[np.ndarray]:
    return list(audio.reshape(-1, SAMPLES_PER_TICK))


def darkening(avatar: LoadedAvatar, tick: int, source: np.ndarray, frame: np.ndarray) -> float:
    """Mean luma lost in the mouth region of ``frame`` compared with ``source`` (both at output size)."""
    height, width = frame.shape[:2]
    index = int(avatar.cycle[tick % len(avatar.cycle)])
    points = avatar.landmarks[index] * np.array([width / avatar.manifest.width, height / avatar.manifest.height])
    right, left = points[mesh.LIPS_INNER_UPPER[0]], points[mesh.LIPS_INNER_UPPER[-1]]
    seam_y = (points[mesh.LIPS_INNER_UPPER[5]][1] + points[mesh.LIPS_INNER_LOWER[5]][1]) / 2
    face_height = points[mesh.CHIN][1] - points[mesh.NOSE_TIP][1]
    span = left[0] - right[0]
    x0, x1 = int(right[0] + 0.15 * span), int(left[0] - 0.15 * span)
    y0, y1 = int(seam_y - 0.1 * face_height), int(seam_y + 0.35 * face_height)
    before = source[y0:y1, x0:x1].astype(np.float32) @ LUMA
    after = frame[y0:y1, x0:x1].astype(np.float32) @ LUMA
    return float(np.maximum(before - after, 0.0).mean())


@pytest.mark.parametrize("output_size", [512, 256])
def test_frames_have_the_output_shape(avatar: LoadedAvatar, sentence: np.ndarray, output_size: int) -> None:
    session = ClassicRenderer().open(avatar, output_size)
    expected = output_shape_for(avatar.manifest.width, avatar.manifest.height, output_size)
    assert session.output_shape == expected and max(expected) == output_size
    for tick, audio in enumerate(ticks(sentence)[:30]):
        for frame in (session.idle_frame(tick), session.render(tick, audio)):
            assert frame.shape == (*expected, 3) and frame.dtype == np.uint8


def test_output_shape_is_even_with_the_longer_side_at_the_output_size() -> None:
    assert output_shape_for(1280, 720, 512) == (288, 512)
    assert output_shape_for(719, 1279, 256) == (256, 144)
    with pytest.raises(ValueError):
        output_shape_for(512, 512, 255)


def test_idle_frame_is_the_cycle_frame(default_avatar: LoadedAvatar) -> None:
    session = ClassicRenderer().open(default_avatar, 512)
    cycle = default_avatar.cycle
    for tick in (0, 1, 7, len(cycle) - 1, len(cycle), 3 * len(cycle) + 5):
        expected = default_avatar.frames[cycle[tick % len(cycle)]]
        assert np.array_equal(session.idle_frame(tick), expected)
    small = ClassicRenderer().open(default_avatar, 256)
    expected = cv2.resize(default_avatar.frames[cycle[9]], (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(small.idle_frame(9).astype(int) - expected).max() <= 1


def test_silence_renders_the_idle_frame(avatar: LoadedAvatar) -> None:
    session = ClassicRenderer().open(avatar, 512)
    rng = np.random.default_rng(0)
    for tick in range(40):
        # Digital silence, then near silence (noise about 70 dB below full scale).
        audio = np.zeros(SAMPLES_PER_TICK, np.float32) if tick < 20 else rng.normal(0, 3e-4, SAMPLES_PER_TICK)
        assert np.array_equal(session.render(tick, audio.astype(np.float32)), session.idle_frame(tick))


def test_mouth_opening_follows_the_speech_envelope(avatar: LoadedAvatar, sentence: np.ndarray) -> None:
    session = ClassicRenderer().open(avatar, 512)
    opening, envelope = [], []
    for tick, audio in enumerate(ticks(sentence)):
        frame = session.render(tick, audio)
        opening.append(darkening(avatar, tick, session.idle_frame(tick), frame))
        envelope.append(max(10 * np.log10(np.mean(audio.astype(np.float64) ** 2) + 1e-12), -60.0))
    opening_arr, envelope_arr = np.array(opening), np.array(envelope)
    assert np.corrcoef(opening_arr, envelope_arr)[0, 1] > 0.6
    assert opening_arr.max() > 20  # clearly visible: a dark cavity, not a shimmer
    # Pauses inside the sentence: closed once the release of the last sound is over.
    paused = (envelope_arr < -55) & (np.convolve(envelope_arr >= -55, np.ones(3), "full")[: len(envelope_arr)] == 0)
    assert paused.any() and opening_arr[paused].max() == 0.0

    # Trailing silence closes the mouth within a few ticks, exactly back to the source.
    start = len(opening)
    for tick in range(start, start + 5):
        frame = session.render(tick, np.zeros(SAMPLES_PER_TICK, np.float32))
    assert np.array_equal(frame, session.idle_frame(start + 4))


def test_reset_closes_the_mouth_on_the_next_frame(default_avatar: LoadedAvatar, sentence: np.ndarray) -> None:
    chunks = ticks(sentence)
    loudest = int(np.argmax([np.mean(chunk**2) for chunk in chunks]))
    silence = np.zeros(SAMPLES_PER_TICK, np.float32)

    held = ClassicRenderer().open(default_avatar, 512)
    held.render(loudest, chunks[loudest])
    # Without a reset the mouth closes over a couple of ticks (release), so the next silent
    # frame still shows it partly open...
    assert not np.array_equal(held.render(loudest + 1, silence), held.idle_frame(loudest + 1))

    interrupted = ClassicRenderer().open(default_avatar, 512)
    interrupted.render(loudest, chunks[loudest])
    interrupted.reset()
    # ...while after a barge-in reset it is closed at once.
    assert np.array_equal(interrupted.render(loudest + 1, silence), interrupted.idle_frame(loudest + 1))


def test_nothing_changes_outside_the_blend_mask(avatar: LoadedAvatar, sentence: np.ndarray) -> None:
    session = ClassicRenderer().open(avatar, 512)
    assert session.output_shape == (avatar.manifest.height, avatar.manifest.width)  # boxes and masks apply as stored
    outside_masks: dict[int, np.ndarray] = {}
    changed_somewhere = False
    for tick, audio in enumerate(ticks(sentence)):
        index = int(avatar.cycle[tick % len(avatar.cycle)])
        if index not in outside_masks:
            x1, y1, x2, y2 = (int(v) for v in avatar.boxes[index])
            inside = np.zeros(session.output_shape, np.uint8)
            inside[y1:y2, x1:x2] = cv2.resize(avatar.masks[index], (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
            outside_masks[index] = cv2.dilate(inside, np.ones((3, 3), np.uint8)) == 0
        changed = (session.render(tick, audio) != session.idle_frame(tick)).any(axis=2)
        assert not (changed & outside_masks[index]).any()
        changed_somewhere |= bool(changed.any())
    assert changed_somewhere


def test_rendering_is_deterministic(avatar: LoadedAvatar, sentence: np.ndarray) -> None:
    renderer = ClassicRenderer()
    first, second = renderer.open(avatar, 256), ClassicRenderer().open(avatar, 256)
    for tick, audio in enumerate(ticks(sentence)[:60]):
        assert np.array_equal(first.render(tick, audio), second.render(tick, audio))


def test_opening_is_continuous_in_time(default_avatar: LoadedAvatar, sentence: np.ndarray) -> None:
    """A slowly swelling tone opens the mouth by small steps: no jumps, no flicker."""
    session = ClassicRenderer().open(default_avatar, 512)
    time = np.arange(SAMPLES_PER_TICK * 50) / RENDER_SAMPLE_RATE
    tone = (np.sin(2 * np.pi * 220 * time) * np.linspace(0.002, 0.3, time.size)).astype(np.float32)
    source = session.idle_frame(0)
    # The same cycle frame every tick: only the mouth differs.
    opening = np.array([darkening(default_avatar, 0, source, session.render(0, chunk)) for chunk in ticks(tone)])
    assert opening[0] == 0.0 and opening[-1] > 20
    assert np.all(np.diff(opening) > -0.5)  # it never closes while the tone swells
    assert np.abs(np.diff(opening)).max() < 0.25 * opening[-1]


def test_mouth_driver_opens_in_the_same_tick_and_closes_in_silence(sentence: np.ndarray) -> None:
    driver = MouthDriver()
    chunks = ticks(sentence)
    loudest = int(np.argmax([np.mean(chunk**2) for chunk in chunks]))
    assert driver.step(np.zeros(SAMPLES_PER_TICK, np.float32)).opening == 0.0
    assert driver.step(chunks[loudest]).opening > 0.8
    openings = [driver.step(np.zeros(SAMPLES_PER_TICK, np.float32)).opening for _ in range(5)]
    assert openings == sorted(openings, reverse=True) and openings[-1] == 0.0


def test_render_takes_exactly_one_tick_of_audio(default_avatar: LoadedAvatar) -> None:
    session = ClassicRenderer().open(default_avatar, 256)
    for bad in (np.zeros(SAMPLES_PER_TICK - 1, np.float32), np.zeros((SAMPLES_PER_TICK, 2), np.float32)):
        with pytest.raises(ValueError):
            session.render(0, bad)


def test_create_renderer(tmp_path) -> None:
    from avatalk.avatars.renderers.fallback import FallbackRenderer
    from avatalk.config import MuseTalkSettings

    assert isinstance(create_renderer("classic"), ClassicRenderer)
    # MuseTalk without its weights (the models folder is an empty temporary one, whatever this machine
    # has installed): the server still starts, and the classic renderer draws every session.
    renderer = create_renderer("musetalk", MuseTalkSettings(models_dir=tmp_path / "no-weights"))
    assert isinstance(renderer, FallbackRenderer)
    status = {entry.name: entry for entry in renderer.status()}
    assert not status["musetalk"].live and "musetalkV15" in (status["musetalk"].reason or "")
    assert status["classic"].live
    with pytest.raises(ValueError, match="classic"):
        create_renderer("wav2lip")


def test_renderer_prepares_an_avatar_once(default_avatar: LoadedAvatar) -> None:
    renderer = ClassicRenderer()
    first, second = renderer.open(default_avatar, 512), renderer.open(default_avatar, 512)
    assert first is not second
    # Shared per-avatar frames, separate per-session state.
    assert first.idle_frame(3) is second.idle_frame(3)
