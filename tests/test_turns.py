import numpy as np

from avatalk.config import TurnSettings, VADSettings
from avatalk.streaming.turns import TurnDetector, TurnEventKind

WINDOW = 512


def run(detector: TurnDetector, probabilities: list[float]) -> list:
    events = []
    for index, probability in enumerate(probabilities):
        window = np.full(WINDOW, index, dtype=np.float32)  # window content = its index
        events += [(index, event) for event in detector.push(window, probability, now=index * 0.032)]
    return events


def detector(**turns) -> TurnDetector:
    return TurnDetector(TurnSettings(**turns), VADSettings(preroll_ms=320))


def test_turn_ends_after_silence_and_keeps_preroll():
    d = detector(end_silence_ms=500, min_speech_ms=100)
    probabilities = [0.0] * 20 + [0.9] * 30 + [0.0] * 20
    events = run(d, probabilities)
    kinds = [event.kind for _, event in events]
    assert kinds == [TurnEventKind.SPEECH_STARTED, TurnEventKind.SPEECH_PAUSED, TurnEventKind.TURN_ENDED]
    index, ended = events[-1]
    # 500 ms of silence = 16 windows after the last voiced window (index 49).
    assert index == 49 + 16
    audio = ended.audio
    first_window = int(audio[0])
    assert first_window == 20 - 10  # 320 ms pre-roll = 10 windows before onset
    assert ended.speech_end_at == 49 * 0.032


def test_sentence_complete_shortens_the_silence():
    d = detector(end_silence_ms=500, sentence_end_silence_ms=250, min_speech_ms=100)
    events = run(d, [0.9] * 30)
    d.note_transcript("That is all I wanted to ask.")
    events = run(d, [0.0] * 20)
    ended = [i for i, e in events if e.kind is TurnEventKind.TURN_ENDED]
    assert ended == [7]  # 8 windows = 256 ms >= 250 ms


def test_short_blip_is_ignored():
    d = detector(min_speech_ms=250)
    events = run(d, [0.9] * 3 + [0.0] * 20)
    kinds = [event.kind for _, event in events]
    assert TurnEventKind.BLIP in kinds and TurnEventKind.TURN_ENDED not in kinds


def test_resumed_speech_continues_the_turn():
    d = detector(end_silence_ms=500, min_speech_ms=100)
    events = run(d, [0.9] * 20 + [0.0] * 5 + [0.9] * 20 + [0.0] * 20)
    kinds = [event.kind for _, event in events]
    assert kinds.count(TurnEventKind.TURN_ENDED) == 1
    assert TurnEventKind.SPEECH_RESUMED in kinds
    assert events[-1][1].speech_ms == 40 * 32


def test_hysteresis_keeps_speech_through_a_dip():
    d = detector(end_silence_ms=500, min_speech_ms=100)
    events = run(d, [0.9] * 10 + [0.4] * 30 + [0.0] * 20)
    ended = [e for _, e in events if e.kind is TurnEventKind.TURN_ENDED][0]
    assert ended.speech_ms == 40 * 32  # 0.4 >= negative threshold counts as speech once speaking


def test_max_turn_length_forces_an_end():
    d = detector(max_turn_s=1.0, min_speech_ms=100)
    events = run(d, [0.9] * 60)
    assert any(e.kind is TurnEventKind.TURN_ENDED for _, e in events)


def test_force_end_and_nothing_to_end():
    d = detector(min_speech_ms=100)
    assert d.force_end(0.0) is None
    run(d, [0.9] * 10)
    event = d.force_end(1.0)
    assert event is not None and event.kind is TurnEventKind.TURN_ENDED
