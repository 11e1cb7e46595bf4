"""MuseTalk end to end on the CPU: random weights in the official layout, frames equal to the official forward.

The test writes random weights the way a user's download is laid out
(``musetalkV15/unet.pth`` + ``musetalk.json``, ``sd-vae/``, ``whisper/``),
loads them with the real loader, prepares an avatar's latents, and renders
speaking frames of a session through the serving path: the media clock's
ticks and queued segments, the fallback renderer, the MuseTalk session, the
scheduler, the generator and the paste. An independent reference forward,
written here from the official inference script (``scripts/inference.py``
of TMElyralab/MuseTalk: the UNet built from ``musetalk.json`` with the
``unet.pth`` state dict, the VAE from ``sd-vae``, Whisper from ``whisper``;
``unet(latents, timesteps=[0], encoder_hidden_states=pe(audio))`` and
``vae.decode(latents / 0.18215)``), must give the same faces and frames.

In CI the UNet and VAE have the v1.5 block structure at reduced widths
(Whisper-tiny is full size), which takes seconds on 2 cores. The full-size
run (UNet 850 M parameters, the real SD VAE: about 2 minutes on 2 cores and
11 GB of memory, 3.4 GB of weights written to a temporary folder) is::

    MUSETALK_E2E_SIZE=full .venv/bin/python -m pytest -q tests/test_musetalk_e2e.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("diffusers")
import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from test_musetalk_features import official_prompts, official_whisper  # noqa: E402

from avatalk.avatars.default_face import ensure_default_avatar  # noqa: E402
from avatalk.avatars.renderers import FallbackRenderer, SpeechSegment  # noqa: E402
from avatalk.avatars.renderers.classic import ClassicRenderer  # noqa: E402
from avatalk.avatars.renderers.musetalk import (  # noqa: E402
    MuseTalkRenderer,
    MuseTalkSession,
    MuseTalkSettings,
    load_latents,
    load_musetalk,
)
from avatalk.avatars.renderers.musetalk.blending import jaw_paste  # noqa: E402
from avatalk.avatars.renderers.musetalk.loader import (  # noqa: E402
    UNET_CONFIG,
    UNET_DIR,
    UNET_WEIGHTS,
    VAE_DIR,
    WHISPER_DIR,
)
from avatalk.avatars.renderers.musetalk.random_models import write_layout  # noqa: E402
from avatalk.avatars.store import AvatarStore, LoadedAvatar  # noqa: E402
from avatalk.streaming.clock import MediaClock  # noqa: E402

SIZE = os.environ.get("MUSETALK_E2E_SIZE", "reduced")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800 if SIZE == "full" else 300)]
OUTPUT = 128
TICKS = 3


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if SIZE not in ("reduced", "full"):
        raise ValueError(f"MUSETALK_E2E_SIZE must be reduced or full, not {SIZE!r}")
    return write_layout(tmp_path_factory.mktemp("models"), SIZE, seed=7)


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> LoadedAvatar:
    root = tmp_path_factory.mktemp("avatars")
    ensure_default_avatar(root, size=OUTPUT, seconds=0.12)  # 3 frames
    return AvatarStore(root).load("ava")


@pytest.fixture(scope="module")
def renderer(layout: Path, avatar: LoadedAvatar) -> Iterator[FallbackRenderer]:
    # A CPU cannot make 25 fps at full size: the budget waits for every frame rather than counting it late.
    settings = MuseTalkSettings(models_dir=layout, frame_budget_ms=60000, look_ahead_ms=0, max_batch=1)
    musetalk = MuseTalkRenderer(settings, models=load_musetalk(layout))  # the real loader
    musetalk.prepare(avatar)
    renderer = FallbackRenderer("musetalk", musetalk, ClassicRenderer())
    yield renderer
    renderer.close()


def speech(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(3)
    t = np.arange(round(seconds * 16000)) / 16000
    audio = 0.3 * np.sin(2 * np.pi * 170 * t) * (1.2 + np.sin(2 * np.pi * 4 * t)) + 0.05 * rng.standard_normal(t.size)
    return audio.astype(np.float32)


class OfficialReference:
    """The official inference forward, on the same files, built without avatalk's loader."""

    def __init__(self, layout: Path) -> None:
        config = json.loads((layout / UNET_DIR / UNET_CONFIG).read_text())
        self.unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        self.unet.load_state_dict(torch.load(layout / UNET_DIR / UNET_WEIGHTS, map_location="cpu", weights_only=True))
        self.unet.eval()
        self.vae = AutoencoderKL.from_pretrained(layout / VAE_DIR).eval()
        self.whisper_dir = layout / WHISPER_DIR

    @torch.no_grad()
    def latents(self, frame_rgb: np.ndarray, box: np.ndarray) -> torch.Tensor:
        """``vae.get_latents_for_unet`` of the official code, with the posterior mean (avatalk's choice)."""
        x1, y1, x2, y2 = (int(v) for v in box)
        crop = cv2.resize(frame_rgb[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
        image = torch.FloatTensor(np.transpose(crop / 255.0, (2, 0, 1)))
        masked = image.clone()
        masked[:, 128:] = 0  # the lower half is masked before normalising
        batch = torch.stack([masked, image]) * 2 - 1
        mean = self.vae.encode(batch).latent_dist.mean * self.vae.config.scaling_factor
        return torch.cat([mean[0], mean[1]])[None]

    @torch.no_grad()
    def face(self, latents: torch.Tensor, audio_prompt: np.ndarray) -> np.ndarray:
        """One generated 256 x 256 RGB face, as ``scripts/inference.py`` makes it."""
        timesteps = torch.tensor([0])
        pred = self.unet(latents, timesteps, encoder_hidden_states=torch.from_numpy(audio_prompt)[None]).sample
        image = self.vae.decode(pred / self.vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
        result: np.ndarray = (image * 255).round().astype("uint8")[0]
        return result


async def test_speaking_frames_equal_the_official_forward(
    renderer: FallbackRenderer, avatar: LoadedAvatar, layout: Path
) -> None:
    audio = speech(0.5)
    clock = MediaClock(16000)
    await clock.enqueue(1, audio, audio)  # the reply segment as the responder queues it
    session = renderer.open(avatar, OUTPUT)
    assert isinstance(session.current, MuseTalkSession) and session.take_fallback() is None
    musetalk = renderer.primary
    assert isinstance(musetalk, MuseTalkRenderer)
    faces: list[np.ndarray] = []
    generate = musetalk.generator.generate

    def keep_faces(latents: torch.Tensor, features: torch.Tensor) -> np.ndarray:
        made = generate(latents, features)
        faces.extend(made)
        return made

    musetalk.generator.generate = keep_faces  # type: ignore[method-assign]
    frames, ticks = [], []
    for _ in range(TICKS):  # what the video stage does for each speaking tick, without its 60 ms limit
        tick = clock.next_tick()
        segments = [SpeechSegment(*queued) for queued in clock.queued_render_audio()]
        session.look_ahead(tick.index, segments)
        assert tick.render_audio is not None
        frames.append(session.render(tick.index, tick.render_audio))
        ticks.append(tick.index)
    session.close()
    assert session.current.stats.generated == TICKS  # type: ignore[attr-defined]

    reference = OfficialReference(layout)
    prompts = official_prompts(official_whisper(layout / WHISPER_DIR, audio), [2 * i for i in ticks])
    for index, tick in enumerate(ticks):
        frame_index = int(avatar.cycle[tick % len(avatar.cycle)])
        source, box = avatar.frames[frame_index], avatar.boxes[frame_index]
        # avatalk stores latents as float16: they must be the reference's own latents to that precision, and the
        # reference forward then takes the stored ones (a float16 rounding flip would move a pixel by 2 levels).
        stored = load_latents(avatar, musetalk.models.vae_id)
        assert stored is not None
        np.testing.assert_allclose(stored[frame_index], reference.latents(source, box)[0].numpy(), rtol=2e-3, atol=2e-3)
        face = reference.face(torch.from_numpy(stored[frame_index : frame_index + 1]).float(), prompts[index])
        difference = np.abs(faces[index].astype(int) - face.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # float32 sums in another order
        paste = jaw_paste(avatar.landmarks[frame_index], box, source.shape[:2])
        assert paste is not None
        x1, y1, x2, y2 = (int(v) for v in box)
        resized = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        expected = source.astype(np.float32)
        region = expected[y1:y2, x1:x2]
        expected[y1:y2, x1:x2] = region * (1 - paste.alpha) + resized * paste.alpha
        assert np.abs(frames[index].astype(np.float32) - expected).max() <= 2.0
        assert np.any(frames[index] != source)  # a mouth was drawn
