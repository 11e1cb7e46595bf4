"""Render-only mode: another voice agent's reply audio in, clock-paired frames and audio out.

A client that already has a voice agent (its own ASR, LLM and TTS) sends the
agent's speech as binary PCM16 frames of any length at the rate it declared;
this stage re-cuts it onto the session's 40 ms tick clock as utterances (from
the first audio to ``output_audio_buffer.commit``), so every tick pairs 40 ms
of that audio with the frame drawn from it, exactly as in a conversation.
``output_audio_buffer.clear`` drops everything queued at once (the agent's own
barge-in).

An utterance starts playing once ``start_buffer_s`` of it has arrived (at
least one tick; or when it is committed): a client that sends at real-time
pace in frames shorter than a tick would otherwise leave the first tick half
empty. What is held beyond the first tick is the jitter the stream can
absorb: the clock takes the first tick as soon as it is queued (a talk spurt,
see ``MediaClock``), so each later tick is taken that much after its audio
was due to arrive, and a frame that comes a little late opens no gap.

The queue is bounded in time: audio sent faster than real time is buffered
up to ``max_buffer_s``; a warning says when half of it is used, and a frame
that would overfill it is refused with an error (never silently dropped), so
the client knows to pace itself.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from avatalk.executors import run_in
from avatalk.media.audio import StreamResampler, pcm16_to_float
from avatalk.media.timebase import ENGINE_SAMPLE_RATE
from avatalk.streaming.clock import MediaClock, QueuedAudio, Tick
from avatalk.streaming.events import OutputAudioCleared, OutputAudioStarted, OutputAudioStopped, WarningEvent
from avatalk.streaming.protocol import ProtocolError
from avatalk.streaming.stage import Emit

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Utterance:
    utterance_id: int
    segments: list[QueuedAudio] = field(default_factory=list)
    committed: bool = False
    held: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)  # before its first tick is full
    held_samples: int = 0
    start_tick: int | None = None
    last_tick: int | None = None

    @property
    def played_out(self) -> bool:
        return all(segment.released >= len(segment.samples) for segment in self.segments)


class RenderFeed:
    """The client's reply audio, cut into utterances on the session's clock."""

    def __init__(
        self,
        *,
        clock: MediaClock,
        input_sample_rate: int,
        emit: Emit,
        executor: Executor,
        with_render_audio: bool,
        max_buffer_s: float,
        start_buffer_s: float,
    ) -> None:
        self._clock = clock
        self._input_rate = input_sample_rate
        self._emit = emit
        self._executor = executor
        self._with_render_audio = with_render_audio
        self._max_buffer_s = max_buffer_s
        self._start_samples = max(clock.samples_per_tick, round(start_buffer_s * clock.sample_rate))
        self._next_id = 1
        self._open: _Utterance | None = None  # receiving audio
        self._playing: list[_Utterance] = []  # committed or open, not yet played out, oldest first
        self._warned = False
        self._resamplers = self._new_resamplers()

    @property
    def busy(self) -> bool:
        return bool(self._playing)

    def _new_resamplers(self) -> tuple[StreamResampler, StreamResampler | None]:
        render = StreamResampler(self._input_rate, ENGINE_SAMPLE_RATE) if self._with_render_audio else None
        return StreamResampler(self._input_rate, self._clock.sample_rate), render

    async def push(self, pcm16: bytes) -> None:
        """Queue one frame of reply audio; raises ``ProtocolError`` when the buffer would overflow."""
        samples = pcm16_to_float(pcm16)
        seconds = len(samples) / self._input_rate
        buffered = self._clock.queued_seconds
        if buffered + seconds > self._max_buffer_s:
            raise ProtocolError(
                "render_buffer_full",
                f"{buffered:.2f} s of audio are already queued and the limit is {self._max_buffer_s:.1f} s: "
                "this frame was not queued; send audio at real-time pace",
            )
        if not self._warned and buffered + seconds > self._max_buffer_s / 2:
            self._warned = True
            await self._emit(
                WarningEvent(
                    code="render_buffer_high",
                    message=f"more than {self._max_buffer_s / 2:.1f} s of audio queued: the client is sending "
                    "faster than real time",
                )
            )
        elif buffered + seconds < self._max_buffer_s / 4:
            self._warned = False
        utterance = self._open
        if utterance is None:
            utterance = self._open = _Utterance(self._next_id)
            self._next_id += 1
            self._playing.append(utterance)
        await self._queue(utterance, samples, last=False)

    async def commit(self) -> None:
        """The current utterance is complete; the next audio starts a new one."""
        utterance, self._open = self._open, None
        if utterance is None:
            raise ProtocolError("no_utterance", "there is no utterance to commit: send audio first")
        await self._queue(utterance, np.zeros(0, np.float32), last=True)
        utterance.committed = True
        self._resamplers = self._new_resamplers()
        if not utterance.segments:  # nothing audible came of it: nothing to announce
            self._playing.remove(utterance)

    async def clear(self) -> None:
        """Drop every queued utterance now: silence (and idle frames) from the next tick on."""
        dropped = self._clock.clear()
        utterances, self._playing, self._open = self._playing, [], None
        self._resamplers = self._new_resamplers()
        ticks = math.ceil(dropped / self._clock.samples_per_tick)
        ids = [utterance.utterance_id for utterance in utterances]
        await self._emit(OutputAudioCleared(utterance_ids=ids, dropped_ticks=ticks))
        logger.info("render session cleared %d utterance(s), %d ticks of audio", len(ids), ticks)

    async def _queue(self, utterance: _Utterance, samples: np.ndarray, last: bool) -> None:
        out_resampler, render_resampler = self._resamplers

        def resample() -> tuple[np.ndarray, np.ndarray | None]:
            out = out_resampler.process(samples, last=last)
            render = render_resampler.process(samples, last=last) if render_resampler is not None else None
            return out, render

        out, render = await run_in(self._executor, resample)
        if not utterance.segments and utterance.held_samples + len(out) < self._start_samples and not last:
            utterance.held.append((out, render))  # wait for the start buffer
            utterance.held_samples += len(out)
            return
        if utterance.held:
            out = np.concatenate([piece for piece, _ in utterance.held] + [out])
            if render is not None:
                render = np.concatenate([piece for _, piece in utterance.held if piece is not None] + [render])
            utterance.held.clear()
        if len(out):
            # Pieces after the first continue the utterance: a renderer takes them as one clip.
            queued = await self._clock.enqueue(utterance.utterance_id, out, render, continues=bool(utterance.segments))
            utterance.segments.append(queued)

    async def on_tick(self, tick: Tick) -> None:
        """After a tick went out: utterances that started or finished playing are announced."""
        if not self._playing:
            return
        utterance = self._playing[0]
        if tick.audio is not None and tick.turn_id == utterance.utterance_id:
            if utterance.start_tick is None:
                utterance.start_tick = tick.index
                await self._emit(OutputAudioStarted(utterance_id=utterance.utterance_id, start_tick=tick.index))
            utterance.last_tick = tick.index
        if utterance.committed and utterance.played_out and utterance.start_tick is not None:
            self._playing.pop(0)
            assert utterance.last_tick is not None
            await self._emit(
                OutputAudioStopped(
                    utterance_id=utterance.utterance_id,
                    start_tick=utterance.start_tick,
                    end_tick=utterance.last_tick + 1,
                )
            )
