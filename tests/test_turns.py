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


def semantic(**turns) -> TurnDetector:
    settings = TurnSettings(semantic_silence_ms=192, semantic_max_silence_ms=1504, min_speech_ms=100, **turns)
    return TurnDetector(settings, VADSettings(preroll_ms=320), semantic=True)


def pause_until_due(d: TurnDetector) -> int:
    """Feed silence until the model should be asked; returns how many windows that took."""
    for index in range(100):
        events = d.push(np.zeros(WINDOW, np.float32), 0.0, now=10.0 + index * 0.032)
        assert all(event.kind is TurnEventKind.SPEECH_PAUSED for event in events)
        if d.verdict_due:
            return index + 1
    raise AssertionError("the verdict never became due")


def test_semantic_complete_verdict_ends_the_turn_after_the_short_silence():
    d = semantic()
    run(d, [0.9] * 20)
    assert pause_until_due(d) == 6  # 192 ms of silence
    pause = d.request_verdict()
    assert not d.verdict_due  # asked once per pause
    ended = d.note_verdict(pause, True, now=11.0)
    assert ended is not None and ended.kind is TurnEventKind.TURN_ENDED and ended.speech_end_at == 19 * 0.032


def test_semantic_incomplete_verdict_waits_for_the_long_silence():
    d = semantic(end_silence_ms=500)
    run(d, [0.9] * 20)
    windows = pause_until_due(d)
    assert d.note_verdict(d.request_verdict(), False, now=11.0) is None
    for index in range(windows, 100):
        events = d.push(np.zeros(WINDOW, np.float32), 0.0, now=11.0 + index * 0.032)
        if events:
            break
    assert [event.kind for event in events] == [TurnEventKind.TURN_ENDED]
    assert index + 1 == 47  # 1504 ms of silence, not end_silence_ms


def test_an_incomplete_verdict_on_words_that_end_a_sentence_waits_only_the_plain_silence():
    d = semantic(end_silence_ms=512)
    run(d, [0.9] * 20)
    d.note_transcript("Can you recommend a good book?")
    windows = pause_until_due(d)
    assert d.note_verdict(d.request_verdict(), False, now=11.0) is None
    for index in range(windows, 100):
        if d.push(np.zeros(WINDOW, np.float32), 0.0, now=11.0 + index * 0.032):
            break
    assert index + 1 == 16  # 512 ms of silence, not the 1504 ms a trailing thought gets


def test_a_verdict_on_an_earlier_pause_is_ignored_and_a_failed_one_falls_back_to_silence_rules():
    d = semantic(end_silence_ms=320)
    run(d, [0.9] * 20)
    pause_until_due(d)
    stale = d.request_verdict()
    run(d, [0.9] * 5)  # the user speaks again before the verdict arrives
    assert d.note_verdict(stale, True, now=11.0) is None and d.in_speech
    windows = pause_until_due(d)
    assert d.note_verdict(d.request_verdict(), None, now=11.0) is None  # 192 ms < 320 ms fallback silence
    extra = 0
    while not [e for e in d.push(np.zeros(WINDOW, np.float32), 0.0, now=12.0) if e.kind is TurnEventKind.TURN_ENDED]:
        extra += 1
    assert windows + extra + 1 == 10  # 320 ms: the silence rule
