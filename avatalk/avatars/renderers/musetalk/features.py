"""MuseTalk's audio conditioning, computed exactly as the official pipeline computes it for a clip.

The UNet was trained on features made one way (musetalk-notes.md, "Audio
conditioning"; the official ``AudioProcessor``), and any other way only
makes lip sync worse, so this module reproduces it step for step:

1. The clip is cut into 30 s pieces; each piece is padded with silence to
   30 s and turned into Whisper's normalised log-mel (Hann window 400, hop
   160, Slaney mel filters, log10, values more than 8 decades below **the
   whole window's** maximum raised to it, then ``(x + 4) / 4``).
2. The Whisper encoder runs over the full window (all 1500 positions attend
   to each other) and every hidden state is kept: the embedding output and
   each layer's output, the last after the final layer norm (5 x 384 per
   Whisper frame for Whisper-tiny, 50 Whisper frames per second).
3. The pieces' states are joined and cut to ``floor(seconds * 50)`` frames.
4. Video frame ``i`` (25 fps) takes Whisper frames ``[2i - 4, 2i + 6)``,
   zeros outside the clip, flattened time-major (token ``5 * time +
   state``), plus a sinusoidal positional encoding.

What is streamed is the clip, not the encoder: the renderer treats each
reply segment the TTS produces (a sentence or clause) as one clip, so the
first frame of a segment waits for that segment's features only. Whisper's
features depend on everything in the window (attention spans all of it, and
the log-mel floor is the window's maximum), so an encoder run on short
chunks, or a running maximum, gives other numbers than the ones the UNet
knows; a 30 s window costs about 23 GFLOP, milliseconds on a GPU. An
utterance that arrives in pieces while it plays (a render session's) is
one clip known so far: ``ClipFeatures`` encodes again only its last 30 s
piece as it grows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from avatalk.media.timebase import ENGINE_SAMPLE_RATE, FPS

#: Whisper's STFT: Hann window of 400 samples, hop 160 (100 mel frames per second).
HOP_LENGTH = 160
N_FFT = 400
#: One encoder output frame is two mel frames (conv2 has stride 2): 20 ms, 50 per second.
SAMPLES_PER_WHISPER_FRAME = 2 * HOP_LENGTH
WHISPER_FPS = ENGINE_SAMPLE_RATE // SAMPLES_PER_WHISPER_FRAME
#: Video frame i's window is Whisper frames [2i - 4, 2i + 6).
WHISPER_FRAMES_PER_VIDEO_FRAME = WHISPER_FPS // FPS
WINDOW_BEFORE = 4
WINDOW_FRAMES = 10
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


def clip_whisper_frames(samples: int) -> int:
    """Whisper frames the official pipeline keeps for a clip of ``samples`` at 16 kHz.

    Computed with the official float formula ``floor(samples / 16000 * 50)``
    rather than ``samples // 320``: they differ for some lengths (9280
    samples give 28, not 29), and the official one decides which frames
    are zeros.
    """
    return math.floor(samples / ENGINE_SAMPLE_RATE * WHISPER_FPS)


def clip_video_frames(samples: int) -> int:
    """Video frames the official pipeline makes for a clip: ``floor(seconds * 25)``."""
    return math.floor(samples / ENGINE_SAMPLE_RATE * FPS)


class WhisperFeatureEncoder:
    """The Whisper encoder and mel filters, run over whole 30 s windows as the official pipeline does.

    Shared by every session: ``encode`` is thread-safe (inference only). On
    CUDA it runs on its own stream, so a session's features are never
    queued behind the render batch running on the GPU.
    """

    def __init__(
        self, encoder: WhisperEncoder, mel_filters: np.ndarray, *, device: torch.device, dtype: torch.dtype
    ) -> None:
        """``mel_filters`` is the feature extractor's ``(n_fft // 2 + 1, n_mels)`` filter bank."""
        self.encoder = encoder.eval().requires_grad_(False)
        self.device = device
        self.dtype = dtype
        self._filters = torch.from_numpy(np.ascontiguousarray(mel_filters.T, dtype=np.float32)).to(device)
        self._window = torch.hann_window(N_FFT, device=device)
        self.n_mels = int(self._filters.shape[0])
        self.d_model = int(encoder.config.d_model)
        #: Hidden states per Whisper frame: the embedding output plus one per layer.
        self.num_states = len(encoder.layers) + 1
        #: Whisper frames in one window (1500 for the real model: 30 s) and its audio.
        self.piece_frames = int(encoder.config.max_source_positions)
        self.piece_samples = self.piece_frames * SAMPLES_PER_WHISPER_FRAME
        #: Audio tokens per video frame (50 for Whisper-tiny) and their positional encoding.
        self.tokens = WINDOW_FRAMES * self.num_states
        self.positional = positional_encoding(self.tokens, self.d_model)
        self.positional.setflags(write=False)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def log_mel(self, pieces: torch.Tensor) -> torch.Tensor:
        """Whisper's normalised log-mel ``(B, n_mels, 2 * piece_frames)`` of ``(B, piece_samples)`` float32 audio.

        The STFT is centred with reflection, its last frame dropped, and the
        8-decade floor taken from each window's own maximum: what
        ``WhisperFeatureExtractor`` does to a padded 30 s window.
        """
        spectrum = torch.stft(
            pieces, N_FFT, HOP_LENGTH, window=self._window, center=True, pad_mode="reflect", return_complex=True
        )
        power = (spectrum[..., :-1].abs() ** 2).contiguous()
        log = torch.clamp(self._filters @ power, min=_LOG_FLOOR).log10()
        peak = log.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log, peak - _DYNAMIC_RANGE) + 4.0) / 4.0

    @torch.inference_mode()
    def encode_pieces(self, pieces: np.ndarray) -> np.ndarray:
        """Hidden states ``(B, piece_frames, num_states, d_model)`` float32 of ``(B, piece_samples)`` windows.

        Each window is 30 s of a clip, already padded with silence; the states
        are ``WhisperEncoder(output_hidden_states=True)``'s, through the
        encoder's public ``forward``, which takes the same arguments in every
        transformers release avatalk supports.
        """
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            mel = self.log_mel(torch.from_numpy(pieces).to(self.device, non_blocking=True))
            output = self.encoder(mel.to(self.dtype), output_hidden_states=True)
            states = torch.stack(output.hidden_states, dim=2)
            result: np.ndarray = states.float().cpu().numpy()
        return result

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """Hidden states of one clip: ``(clip_whisper_frames(len(audio)), num_states, d_model)`` float32.

        Every 30 s piece is padded to a full window and encoded (in one
        batch), the pieces joined and cut as the official pipeline does.
        """
        clip = ClipFeatures(self)
        clip.update(np.asarray(audio, dtype=np.float32).reshape(-1))
        return clip.states

    def windows(self, states: np.ndarray, starts: Sequence[int] | np.ndarray) -> np.ndarray:
        """UNet ``encoder_hidden_states`` ``(len(starts), tokens, d_model)`` of a clip's ``states``.

        Entry ``k`` holds Whisper frames ``[starts[k] - 4, starts[k] + 6)``
        of the clip (zeros outside it), time-major, plus the positional
        encoding: video frame ``i`` of the clip is ``starts = [2 * i]``.
        """
        first = np.asarray(starts, dtype=np.int64).reshape(-1, 1) - WINDOW_BEFORE
        index = first + np.arange(WINDOW_FRAMES)
        inside = (index >= 0) & (index < len(states))
        if len(states):
            gathered = states[np.clip(index, 0, len(states) - 1)] * inside[..., None, None]
        else:
            gathered = np.zeros((*index.shape, self.num_states, self.d_model), np.float32)
        tokens = gathered.reshape(len(index), self.tokens, self.d_model).astype(np.float32, copy=False)
        result: np.ndarray = tokens + self.positional
        return result


class ClipFeatures:
    """The Whisper states of one clip whose audio may still grow (an utterance streamed in pieces).

    The official recipe encodes each 30 s piece of a clip on its own, so
    when the clip grows only its last piece is encoded again: pieces that
    were complete keep their states. Not thread-safe: one session uses it.
    """

    def __init__(self, encoder: WhisperFeatureEncoder) -> None:
        self._encoder = encoder
        self._buffer = np.zeros((0, encoder.num_states, encoder.d_model), np.float32)
        self._length = 0  # samples the states were computed from

    @property
    def states(self) -> np.ndarray:
        """The clip's states so far, cut as the official pipeline cuts them (a view, not a copy)."""
        return self._buffer[: clip_whisper_frames(self._length)]

    def update(self, audio: np.ndarray) -> None:
        """Bring the states up to ``audio``, the clip so far (it only ever grows at its end)."""
        if len(audio) == self._length:
            return
        encoder = self._encoder
        size, frames = encoder.piece_samples, encoder.piece_frames
        keep = self._length // size  # pieces that were complete: their states are final
        rest = audio[keep * size :]
        count = -(-len(rest) // size)
        padded = np.zeros((count, size), np.float32)
        padded.reshape(-1)[: len(rest)] = rest
        needed = (keep + count) * frames
        if len(self._buffer) < needed:
            grown = np.zeros((needed, encoder.num_states, encoder.d_model), np.float32)
            grown[: keep * frames] = self._buffer[: keep * frames]
            self._buffer = grown
        self._buffer[keep * frames : needed] = encoder.encode_pieces(padded).reshape(-1, *self._buffer.shape[1:])
        self._length = len(audio)

    def windows(self, starts: Sequence[int]) -> np.ndarray:
        """The UNet's ``encoder_hidden_states`` of windows starting at Whisper frames ``starts`` (see ``windows``)."""
        return self._encoder.windows(self.states, starts)
