"""MuseTalk's audio conditioning, computed as reply audio streams in.

What the UNet expects (musetalk-notes.md, "Audio conditioning"): the
Whisper-tiny encoder's hidden states (the embedding output and every layer's
output, ``S`` = 5 states of ``D`` = 384), 50 Whisper frames per second; video
frame ``i`` (25 fps) takes Whisper frames ``[2i - 4, 2i + 6)``, zeros outside
the clip, flattened time-major to ``10 * S`` tokens (token ``S * time +
state``) plus a sinusoidal positional encoding.

The official code encodes each 30 s piece of a whole clip at once, padded
with silence. A conversation cannot wait for the whole clip, and padding
every 40 ms to 30 s would waste the GPU, so this module encodes *blocks*:

- Block ``b`` is Whisper frames ``[2b, 2b + 2)``, the 40 ms of tick ``b`` of
  the speech segment; frame ``i`` needs blocks ``i - 2 .. i + 2``.
- Each block is encoded in a window of its own: ``left`` Whisper frames
  before it and ``right`` after it, cut at the edges of its 30 s piece.
  Blocks never straddle pieces, and pieces are exactly the official ones
  (the segment's audio cut every 30 s, each encoded on its own), so
  **Whisper positions are the frame's index within its 30 s piece**, the
  same learned position embedding the official code gives that audio.
- A block is *complete* when all the audio its window needs is known; its
  hidden states are then final and cached. Frame ``i`` is *ready* when
  blocks ``i - 2 .. i + 2`` are complete: that needs ``right`` + 120 ms
  (plus 2.5 ms of STFT half-window) of audio after the frame.
- A frame needed before it is ready (nothing more is known yet) is
  computed as if the clip ended at the known audio: blocks without audio
  are zeros, and the known blocks that are not complete are encoded
  together in one window that ends there. So frame ``i`` rendered with
  audio known up to sample ``n`` is exactly frame ``i`` of the clip
  ``audio[:n]``, whatever the chunking.

The log-mel spectrogram follows Whisper's feature extractor (Hann window
of 400, hop 160, Slaney mel filters, log10, values more than 8 below the
maximum raised to it, then ``(x + 4) / 4``) with the 30 s piece's maximum
replaced by the running maximum of the piece so far, which streaming can
know. With a context that covers whole pieces (``left``, ``right`` >= the
piece length) and clips of whole pieces, the features equal the official
computation to rounding; with a bounded context, attention sees only the
window, which is the price of streaming.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.nn import functional
from transformers.models.whisper.modeling_whisper import WhisperEncoder

#: Whisper's audio rate and the STFT it runs (Hann window of 400, hop 160: 100 mel frames/s).
HOP_LENGTH = 160
N_FFT = 400
#: One encoder output frame is two mel frames (conv2 has stride 2): 20 ms, 50 per second.
SAMPLES_PER_WHISPER_FRAME = 2 * HOP_LENGTH
#: A 40 ms video frame (one tick) spans two Whisper frames: one block.
WHISPER_FRAMES_PER_BLOCK = 2
SAMPLES_PER_BLOCK = WHISPER_FRAMES_PER_BLOCK * SAMPLES_PER_WHISPER_FRAME
#: Frame i's window is Whisper frames [2i - 4, 2i + 6): blocks i - 2 .. i + 2.
BLOCKS_BEFORE = 2
BLOCKS_AFTER = 2
WINDOW_BLOCKS = BLOCKS_BEFORE + 1 + BLOCKS_AFTER
WINDOW_FRAMES = WINDOW_BLOCKS * WHISPER_FRAMES_PER_BLOCK
#: Whisper's log-mel floor and dynamic range (values more than 8 decades below the peak are raised).
_LOG_FLOOR = 1e-10
_DYNAMIC_RANGE = 8.0


def positional_encoding(length: int, d_model: int) -> np.ndarray:
    """MuseTalk's sinusoidal encoding added to the audio tokens: ``(length, d_model)`` float32.

    Base 10000, sine on even dimensions and cosine on odd ones, computed in
    float32 torch as the official ``PositionalEncoding`` does, so the values
    match it bit for bit.
    """
    position = torch.arange(0, length, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    result: np.ndarray = table.numpy()
    return result


class WhisperFeatureEncoder:
    """The Whisper encoder's weights and mel filters, run on short windows instead of 30 s.

    Shared by every session: ``encode`` is thread-safe (inference only). On
    CUDA it runs on its own stream, so a session's features are never
    queued behind the render batch that is running on the GPU.
    """

    def __init__(
        self, encoder: WhisperEncoder, mel_filters: np.ndarray, *, device: torch.device, dtype: torch.dtype
    ) -> None:
        """``mel_filters`` is the feature extractor's ``(n_fft // 2 + 1, n_mels)`` filter bank."""
        self.encoder = encoder.eval().requires_grad_(False)
        self.device = device
        self.dtype = dtype
        self._filters = torch.from_numpy(np.ascontiguousarray(mel_filters.T, dtype=np.float32))
        self._window = torch.hann_window(N_FFT)
        self.n_mels = int(self._filters.shape[0])
        self.d_model = int(encoder.config.d_model)
        #: Hidden states per Whisper frame: the embedding output plus one per layer.
        self.num_states = len(encoder.layers) + 1
        #: Whisper frames in one piece (30 s for the real model): the length of the position table.
        self.piece_frames = int(encoder.config.max_source_positions)
        #: Audio tokens per video frame (50 for Whisper-tiny) and their positional encoding.
        self.tokens = WINDOW_FRAMES * self.num_states
        self.positional = positional_encoding(self.tokens, self.d_model)
        self.positional.setflags(write=False)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def log_mel(self, signal: np.ndarray) -> np.ndarray:
        """Raw log10 mel frames ``(n_mels, frames)`` of ``signal``, already padded: no centring here.

        Frame ``m`` covers ``signal[160 m : 160 m + 400]``. The dynamic-range
        clamp and scaling are applied per window by the caller because the
        clamp depends on the piece's peak.
        """
        spectrum = torch.stft(
            torch.from_numpy(signal), N_FFT, HOP_LENGTH, window=self._window, center=False, return_complex=True
        )
        mel = self._filters @ (spectrum.abs() ** 2)
        result: np.ndarray = torch.clamp(mel, min=_LOG_FLOOR).log10().numpy()
        return result

    @torch.inference_mode()
    def encode(self, mels: np.ndarray, starts: Sequence[int]) -> np.ndarray:
        """Hidden states of windows of equal length: ``(B, frames, num_states, d_model)`` float32.

        ``mels`` is ``(B, n_mels, 2 * frames)`` normalised log-mel; window
        ``k`` starts at Whisper position ``starts[k]`` of its piece. The
        states are those of ``WhisperEncoder(output_hidden_states=True)``:
        the embedding output, layers 1..n-1, and the last layer after the
        final layer norm.
        """
        encoder = self.encoder
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            x = torch.from_numpy(mels).to(self.device, self.dtype, non_blocking=True)
            hidden = functional.gelu(encoder.conv1(x))
            hidden = functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
            frames = hidden.shape[1]
            first = torch.as_tensor(list(starts), device=self.device)[:, None]
            positions = first + torch.arange(frames, device=self.device)
            hidden = hidden + encoder.embed_positions.weight[positions]
            states = [hidden]
            for layer in encoder.layers:
                out = layer(hidden, None)
                hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
                states.append(hidden)
            states[-1] = encoder.layer_norm(hidden)
            result: np.ndarray = torch.stack(states, dim=2).float().cpu().numpy()
        return result


class _Piece:
    """One 30 s piece of the segment: its audio and its final log-mel frames with their running peak."""

    def __init__(self, index: int, frames: int, n_mels: int) -> None:
        self.index = index
        self.audio = np.zeros(frames * SAMPLES_PER_WHISPER_FRAME, np.float32)
        self.known = 0  # samples of this piece received so far
        self.mel = np.empty((n_mels, 2 * frames), np.float32)  # raw log10 mel, final frames only
        self.peak = np.empty(2 * frames, np.float32)  # running maximum of the mel up to each frame
        self.final = 0  # mel frames whose audio is all known

    @property
    def complete(self) -> bool:
        return self.known == len(self.audio)

    def final_frames(self) -> int:
        """Mel frames whose 400-sample window is entirely known (the piece end reflects once complete)."""
        if self.complete:
            return self.mel.shape[1]
        if self.known < N_FFT // 2:
            return 0
        return min(self.mel.shape[1], (self.known - N_FFT // 2) // HOP_LENGTH + 1)

    def signal(self, first: int, stop: int) -> np.ndarray:
        """The samples mel frames ``[first, stop)`` read, padded as Whisper's centred STFT pads.

        Before the piece: reflection about its first sample; after a complete
        piece: reflection about its last; beyond the known audio: silence
        (the clip ends there, as the official zero padding has it).
        """
        index = np.arange(first * HOP_LENGTH - N_FFT // 2, (stop - 1) * HOP_LENGTH + N_FFT // 2)
        index = np.abs(index)
        size = len(self.audio)
        if self.complete:
            index = np.where(index >= size, 2 * (size - 1) - index, index)
        values = self.audio[np.minimum(index, size - 1)]
        values[index >= self.known] = 0.0
        return values


class AudioFeatureStream:
    """The audio features of one speech segment, as its audio arrives (one per session).

    Push audio with ``push``; ``ready_frames`` says how many leading video
    frames have their full context; ``features`` returns the UNet's
    ``encoder_hidden_states`` of any frames, computing only what is missing.
    Not thread-safe: a session drives it from one thread at a time.
    """

    def __init__(self, encoder: WhisperFeatureEncoder, *, left: int, right: int) -> None:
        """``left`` and ``right``: Whisper frames of context around each block (20 ms each)."""
        if left < 0 or right < 0:
            raise ValueError("context must not be negative")
        if encoder.piece_frames % WHISPER_FRAMES_PER_BLOCK:
            raise ValueError("the Whisper position table must hold an even number of frames")
        self.encoder = encoder
        self.left = left
        self.right = right
        self._pieces: dict[int, _Piece] = {}
        self._blocks: dict[int, np.ndarray] = {}
        self._known = 0
        self._complete = 0
        self._released = 0

    @property
    def known_blocks(self) -> int:
        """Blocks (ticks) whose audio is entirely known."""
        return self._known // SAMPLES_PER_BLOCK

    def ready_frames(self) -> int:
        """Number of leading video frames whose features are final (full right context known)."""
        return max(0, self._complete - BLOCKS_AFTER)

    def samples(self, start: int, stop: int) -> np.ndarray:
        """A copy of known samples ``[start, stop)`` of the segment (for checking repeated audio)."""
        if not 0 <= start <= stop <= self._known:
            raise ValueError(f"samples [{start}, {stop}) are not all known ({self._known} are)")
        parts = []
        size = self.encoder.piece_frames * SAMPLES_PER_WHISPER_FRAME
        while start < stop:
            piece = self._pieces[start // size]
            offset = start - piece.index * size
            take = min(stop - start, size - offset)
            parts.append(piece.audio[offset : offset + take])
            start += take
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def push(self, audio: np.ndarray) -> None:
        """Append the next samples of the segment (16 kHz float32, any length)."""
        samples = np.asarray(audio, dtype=np.float32).reshape(-1)
        size = self.encoder.piece_frames * SAMPLES_PER_WHISPER_FRAME
        while samples.size:
            index = self._known // size
            piece = self._pieces.get(index)
            if piece is None:
                piece = self._pieces[index] = _Piece(index, self.encoder.piece_frames, self.encoder.n_mels)
            take = min(samples.size, size - piece.known)
            piece.audio[piece.known : piece.known + take] = samples[:take]
            piece.known += take
            self._known += take
            samples = samples[take:]
            self._extend_mel(piece)
        while self._block_complete(self._complete):
            self._complete += 1

    def release(self, frame: int) -> None:
        """Frames before ``frame`` will not be asked for again: free what only they needed."""
        first_block = frame - BLOCKS_BEFORE
        if first_block <= self._released:
            return
        self._released = first_block
        for block in [b for b in self._blocks if b < first_block]:
            del self._blocks[block]
        # Blocks not yet complete still need their piece to become complete.
        keep = max(0, min(first_block, self._complete))
        first_piece = keep * WHISPER_FRAMES_PER_BLOCK // self.encoder.piece_frames
        for index in [i for i in self._pieces if i < first_piece]:
            del self._pieces[index]

    def features(self, frames: Iterable[int], *, provisional: bool = False) -> np.ndarray:
        """``encoder_hidden_states`` of video frames (segment-relative): ``(n, tokens, d_model)`` float32.

        Frames that are not ready raise ``ValueError`` unless ``provisional``
        is set; they are then computed as if the clip ended at the audio
        known now (see the module docstring).
        """
        frames = list(frames)
        needed = sorted({b for i in frames for b in range(i - BLOCKS_BEFORE, i + BLOCKS_AFTER + 1) if b >= 0})
        if any(b < self._released for b in needed):
            raise ValueError("features of released frames were asked for")
        self._encode_complete([b for b in needed if b < self._complete and b not in self._blocks])
        tail: dict[int, np.ndarray] = {}
        if any(self._complete <= b < self.known_blocks for b in needed):
            if not provisional:
                raise ValueError("frame features asked for before their audio context is known")
            tail = self._encode_tail()
        encoder = self.encoder
        zeros = np.zeros((WHISPER_FRAMES_PER_BLOCK, encoder.num_states, encoder.d_model), np.float32)
        out = np.empty((len(frames), encoder.tokens, encoder.d_model), np.float32)
        for row, frame in enumerate(frames):
            window = [
                self._blocks.get(b, tail.get(b, zeros)) if b >= 0 else zeros
                for b in range(frame - BLOCKS_BEFORE, frame + BLOCKS_AFTER + 1)
            ]
            out[row] = np.concatenate(window).reshape(encoder.tokens, encoder.d_model)
        out += encoder.positional
        return out

    # --- internals ----------------------------------------------------------------

    def _extend_mel(self, piece: _Piece) -> None:
        """Compute the mel frames that became final, and the running peak over them."""
        final = piece.final_frames()
        if final <= piece.final:
            return
        mel = self.encoder.log_mel(piece.signal(piece.final, final))
        piece.mel[:, piece.final : final] = mel
        peaks = np.maximum.accumulate(mel.max(axis=0))
        if piece.final:
            peaks = np.maximum(peaks, piece.peak[piece.final - 1])
        piece.peak[piece.final : final] = peaks
        piece.final = final

    def _window(self, block: int) -> tuple[_Piece, int, int]:
        """A block's piece and its full window ``[start, stop)`` in Whisper frames of that piece."""
        frames = self.encoder.piece_frames
        first = block * WHISPER_FRAMES_PER_BLOCK
        piece = self._pieces[first // frames]
        local = first - piece.index * frames
        return piece, max(0, local - self.left), min(frames, local + WHISPER_FRAMES_PER_BLOCK + self.right)

    def _block_complete(self, block: int) -> bool:
        if block >= self.known_blocks:
            return False
        piece, _, stop = self._window(block)
        return piece.final >= 2 * stop

    def _normalised(self, piece: _Piece, start: int, stop: int) -> np.ndarray:
        """Whisper's normalised log-mel of Whisper frames ``[start, stop)`` of a piece.

        Frames past the final ones are computed with silence after the known
        audio; the clamp uses the peak of the piece up to the window's end.
        """
        first, last = 2 * start, 2 * stop
        final = min(piece.final, last)
        parts = [piece.mel[:, first:final]] if final > first else []
        peak = piece.peak[final - 1] if final > 0 else -np.inf
        if final < last:
            extra = self.encoder.log_mel(piece.signal(max(first, final), last))
            parts.append(extra)
            peak = max(peak, float(extra.max()))
        mel = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        result: np.ndarray = (np.maximum(mel, peak - _DYNAMIC_RANGE) + 4.0) / 4.0
        return result

    def _encode_complete(self, blocks: list[int]) -> None:
        """Encode complete blocks, batching windows of the same length into one call."""
        groups: dict[int, list[tuple[int, _Piece, int, int]]] = {}
        for block in blocks:
            piece, start, stop = self._window(block)
            groups.setdefault(stop - start, []).append((block, piece, start, stop))
        for group in groups.values():
            mels = np.stack([self._normalised(piece, start, stop) for _, piece, start, stop in group])
            states = self.encoder.encode(mels, [start for _, _, start, _ in group])
            for (block, piece, start, _), hidden in zip(group, states, strict=True):
                local = block * WHISPER_FRAMES_PER_BLOCK - piece.index * self.encoder.piece_frames - start
                self._blocks[block] = hidden[local : local + WHISPER_FRAMES_PER_BLOCK].copy()

    def _encode_tail(self) -> dict[int, np.ndarray]:
        """Known but incomplete blocks, encoded in one window ending at the known audio (not cached).

        They all lie in the last piece: a block of an earlier piece is
        complete once a later piece has audio.
        """
        first, last = self._complete, self.known_blocks
        piece, start, _ = self._window(first)
        stop = self._known // SAMPLES_PER_WHISPER_FRAME - piece.index * self.encoder.piece_frames
        states = self.encoder.encode(self._normalised(piece, start, stop)[None], [start])[0]
        tail = {}
        for block in range(first, last):
            local = block * WHISPER_FRAMES_PER_BLOCK - piece.index * self.encoder.piece_frames - start
            tail[block] = states[local : local + WHISPER_FRAMES_PER_BLOCK]
        return tail
