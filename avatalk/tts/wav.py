"""Incremental WAV decoding for backends that receive speech as a WAV byte stream.

espeak-ng writes a WAV to a pipe and OpenAI-compatible speech servers send
one over HTTP; both are decoded as the bytes arrive, including the headers of
streaming writers, whose sizes are unknown when the header is written.
"""

from __future__ import annotations

import struct

import numpy as np

from avatalk.tts.base import TTSError

# WAV format codes: integer PCM, IEEE float, and the extensible wrapper whose
# sub-format GUID starts with one of the former.
_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_FLOAT = 3
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# Streaming writers that do not know the length put one of these as a size.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


class WavStreamDecoder:
    """Decode a RIFF/WAV byte stream incrementally into mono float32 samples.

    Feed bytes as they arrive; samples come out as soon as the header has
    been read. Supports 16-bit and 32-bit integer PCM and 32-bit float, any
    channel count (mixed down to mono). A data chunk whose size is 0 or
    0xFFFFFFFF (streaming writers) runs to the end of the stream.
    """

    def __init__(self) -> None:
        """Start before the RIFF header."""
        self._pending = b""
        self._header_done = False
        self._data_left: int | None = None  # None: until the end of the stream
        self.sample_rate: int | None = None
        self.channels = 0
        self._sample_width = 0
        self._is_float = False

    def feed(self, data: bytes) -> np.ndarray:
        """Add bytes; return the complete samples they finish (possibly none)."""
        self._pending += data
        if not self._header_done and not self._parse_header():
            return np.zeros(0, dtype=np.float32)
        frame_bytes = self._sample_width * self.channels
        usable = len(self._pending) - len(self._pending) % frame_bytes
        if self._data_left is not None:
            usable = min(usable, self._data_left - self._data_left % frame_bytes)
            self._data_left -= usable
        chunk, self._pending = self._pending[:usable], self._pending[usable:]
        if self._data_left is not None and self._data_left < frame_bytes:
            self._pending = b""  # past the data chunk: trailing chunks are ignored
        return self._to_float(chunk)

    def finish(self) -> None:
        """Check the stream was a WAV with a data chunk; raises ``TTSError`` if not."""
        if not self._header_done:
            raise TTSError("the audio is not a complete WAV file (no data chunk found)")

    def _parse_header(self) -> bool:
        """Consume the RIFF header up to the data chunk; False if more bytes are needed."""
        buffer = self._pending
        if len(buffer) < 12:
            return False
        if buffer[:4] != b"RIFF" or buffer[8:12] != b"WAVE":
            raise TTSError(f"the audio is not a WAV file (starts with {buffer[:12]!r})")
        offset = 12
        while True:
            if len(buffer) < offset + 8:
                return False
            chunk_id = buffer[offset : offset + 4]
            (size,) = struct.unpack_from("<I", buffer, offset + 4)
            body = offset + 8
            if chunk_id == b"data":
                if self.sample_rate is None:
                    raise TTSError("the WAV data chunk comes before its format chunk")
                self._data_left = None if size in _UNKNOWN_SIZES else size
                self._pending = buffer[body:]
                self._header_done = True
                return True
            if size == 0xFFFFFFFF:
                raise TTSError(f"the WAV chunk {chunk_id!r} has no size")
            end = body + size + (size & 1)  # chunks are padded to even sizes
            if len(buffer) < end:
                return False
            if chunk_id == b"fmt ":
                self._parse_format(buffer[body : body + size])
            offset = end

    def _parse_format(self, chunk: bytes) -> None:
        """Read channels, rate and sample type from a ``fmt `` chunk."""
        if len(chunk) < 16:
            raise TTSError("the WAV format chunk is truncated")
        format_code, channels, sample_rate, _, _, bits = struct.unpack_from("<HHIIHH", chunk)
        if format_code == _WAVE_FORMAT_EXTENSIBLE and len(chunk) >= 26:
            (format_code,) = struct.unpack_from("<H", chunk, 24)
        if channels < 1 or sample_rate < 1:
            raise TTSError(f"the WAV header is invalid ({channels} channels at {sample_rate} Hz)")
        if (format_code, bits) not in ((_WAVE_FORMAT_PCM, 16), (_WAVE_FORMAT_PCM, 32), (_WAVE_FORMAT_FLOAT, 32)):
            raise TTSError(f"unsupported WAV sample format (code {format_code}, {bits} bits)")
        self.sample_rate = sample_rate
        self.channels = channels
        self._sample_width = bits // 8
        self._is_float = format_code == _WAVE_FORMAT_FLOAT

    def _to_float(self, chunk: bytes) -> np.ndarray:
        """Interleaved little-endian frames -> mono float32 in [-1, 1]."""
        if self._is_float:
            samples = np.frombuffer(chunk, dtype="<f4").astype(np.float32)
        elif self._sample_width == 2:
            samples = np.frombuffer(chunk, dtype="<i2").astype(np.float32) / 32768.0
        else:
            samples = (np.frombuffer(chunk, dtype="<i4") / 2147483648.0).astype(np.float32)
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        return np.clip(samples, -1.0, 1.0)
