"""Loading MuseTalk v1.5 from the official folder layout, with errors that say what to fix.

The layout is the one the official release uses, so a user can point
avatalk at an existing MuseTalk ``models/`` folder::

    models/musetalkV15/unet.pth        plain state dict (diffusers key names)
    models/musetalkV15/musetalk.json   its UNet2DConditionModel config
    models/sd-vae/                     stabilityai/sd-vae-ft-mse (diffusers format)
    models/whisper/                    openai/whisper-tiny (transformers format)

Nothing is ever downloaded here. Every problem a user can cause (a file
missing, a config that is not MuseTalk's, weights that do not fit the
config) raises ``MuseTalkWeightsError`` naming the file and the fix; it is a
``RendererUnavailable``, so a server treats it like any renderer that
cannot run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from transformers import WhisperFeatureExtractor, WhisperModel

from avatalk.avatars.renderers.base import RendererUnavailable
from avatalk.avatars.renderers.musetalk.features import HOP_LENGTH, N_FFT, WhisperFeatureEncoder
from avatalk.media.timebase import ENGINE_SAMPLE_RATE as SAMPLE_RATE

logger = logging.getLogger(__name__)

UNET_DIR = "musetalkV15"
UNET_WEIGHTS = "unet.pth"
UNET_CONFIG = "musetalk.json"
VAE_DIR = "sd-vae"
WHISPER_DIR = "whisper"
_VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_WHISPER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

DOWNLOAD_HINT = "docs/avatars.md, section 'MuseTalk (GPU)', says where to download the weights"

#: The block structure of MuseTalk v1.5's UNet; channel widths may differ (tests use tiny ones).
V15_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
V15_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

#: ``musetalkV15/musetalk.json`` of the official release.
UNET_V15_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": list(V15_DOWN_BLOCKS),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": list(V15_UP_BLOCKS),
}
#: ``config.json`` of stabilityai/sd-vae-ft-mse.
SD_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
#: The shape of openai/whisper-tiny (the encoder is all MuseTalk uses).
WHISPER_TINY_CONFIG: dict[str, Any] = {
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51865,
}


Module = TypeVar("Module", bound=torch.nn.Module)


def for_inference(module: Module, device: torch.device, dtype: torch.dtype) -> Module:
    """``module`` moved to ``device`` and ``dtype``, in eval mode, without gradients."""
    moved: Module = module.to(device=device, dtype=dtype)
    return moved.eval().requires_grad_(False)


class MuseTalkWeightsError(RendererUnavailable):
    """MuseTalk weights are missing, incomplete or do not fit together; the message names the file and the fix."""


@dataclass(frozen=True)
class MuseTalkModels:
    """The three networks of MuseTalk on one device, ready for inference.

    ``vae_id`` identifies the VAE's weights: avatar latents record it, so
    latents made by another VAE are never mixed with this decoder.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    audio: WhisperFeatureEncoder
    device: torch.device
    dtype: torch.dtype
    vae_id: str


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without it is ``RendererUnavailable``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RendererUnavailable(
            f"the musetalk renderer is not available: it is set to run on {name}, but this machine has no CUDA GPU"
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA (as the reference pipeline runs) and float32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def missing_files(models_dir: Path) -> list[Path]:
    """Files of the layout that are absent (for one weights file, either format will do)."""
    root = Path(models_dir)
    missing = [root / UNET_DIR / UNET_WEIGHTS, root / UNET_DIR / UNET_CONFIG, root / VAE_DIR / "config.json"]
    if not any((root / VAE_DIR / name).is_file() for name in _VAE_WEIGHTS):
        missing.append(root / VAE_DIR / _VAE_WEIGHTS[1])
    missing += [root / WHISPER_DIR / "config.json", root / WHISPER_DIR / "preprocessor_config.json"]
    if not any((root / WHISPER_DIR / name).is_file() for name in _WHISPER_WEIGHTS):
        missing.append(root / WHISPER_DIR / _WHISPER_WEIGHTS[1])
    return [path for path in missing if not path.is_file()]


def _require(models_dir: Path) -> None:
    missing = missing_files(models_dir)
    if missing:
        listed = ", ".join(str(path) for path in missing)
        raise MuseTalkWeightsError(
            f"the musetalk renderer is not available: its weights are incomplete, missing {listed}. {DOWNLOAD_HINT}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MuseTalkWeightsError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise MuseTalkWeightsError(f"{path} must hold a JSON object")
    return data


def check_unet_config(config: dict[str, Any], path: Path) -> None:
    """Reject a config that is not a MuseTalk v1.5 UNet, naming the first wrong key."""
    expected: dict[str, Any] = {
        "in_channels": 8,
        "out_channels": 4,
        "down_block_types": list(V15_DOWN_BLOCKS),
        "up_block_types": list(V15_UP_BLOCKS),
    }
    name = config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise MuseTalkWeightsError(f"{path}: _class_name is {name!r}, not a MuseTalk UNet (UNet2DConditionModel)")
    for key, value in expected.items():
        actual = config.get(key)
        if actual != value:
            raise MuseTalkWeightsError(
                f"{path}: {key} is {actual!r} but MuseTalk v1.5 needs {value!r}; this is not the musetalk.json "
                f"of the v1.5 release ({DOWNLOAD_HINT})"
            )
    channels = config.get("block_out_channels")
    if not isinstance(channels, list) or len(channels) != len(V15_DOWN_BLOCKS):
        raise MuseTalkWeightsError(f"{path}: block_out_channels must list {len(V15_DOWN_BLOCKS)} widths")
    if not isinstance(config.get("cross_attention_dim"), int):
        raise MuseTalkWeightsError(f"{path}: cross_attention_dim must be an integer (384 for Whisper-tiny)")


def _shape_report(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> str | None:
    """What differs between a state dict and the model's parameters, or None when they fit."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} is {list(state[key].shape)} in the weights but {list(shape)} in the config"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != tuple(shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensors differ in shape ({'; '.join(mismatched[:4])})")
    if missing:
        problems.append(f"{len(missing)} tensors are missing ({', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are unknown ({', '.join(unexpected[:4])})")
    return "; ".join(problems) or None


def _load_state_dict(path: Path) -> object:
    """Memory-mapped when possible (3.4 GB need not be read before the shapes are checked)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def load_unet(folder: Path, *, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """``unet.pth`` built with ``musetalk.json``, checked tensor by tensor before anything is allocated."""
    config_path, weights_path = folder / UNET_CONFIG, folder / UNET_WEIGHTS
    config = _read_json(config_path)
    check_unet_config(config, config_path)
    try:
        with torch.device("meta"):
            model: UNet2DConditionModel = UNet2DConditionModel.from_config(
                {k: v for k, v in config.items() if not k.startswith("_")}
            )
    except (TypeError, ValueError) as error:
        raise MuseTalkWeightsError(f"{config_path} is not a usable UNet config: {error}") from None
    try:
        state = _load_state_dict(weights_path)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise MuseTalkWeightsError(f"{weights_path} cannot be read as a PyTorch state dict ({error})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MuseTalkWeightsError(f"{weights_path} is not a plain state dict of tensors")
    report = _shape_report(state, {key: value.shape for key, value in model.state_dict().items()})
    if report is not None:
        raise MuseTalkWeightsError(
            f"{weights_path} does not fit {config_path}: {report}. Use the unet.pth and musetalk.json of the same "
            "MuseTalk v1.5 release (an early musetalk.json described a different conv_in)"
        )
    model.load_state_dict(state, assign=True)
    return for_inference(model, device, dtype)


def vae_fingerprint(folder: Path) -> str:
    """A cheap identity of the VAE's files: its config and the size, head and tail of its weights.

    Hashing 335 MB on every start would be slow; config plus size plus the
    first and last MiB tells releases and fine-tunes apart.
    """
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for name in _VAE_WEIGHTS:
        path = folder / name
        if path.is_file():
            size = path.stat().st_size
            digest.update(f"{name}:{size}".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                digest.update(handle.read(1 << 20))
    return "sha256:" + digest.hexdigest()[:32]


def load_vae(folder: Path, *, device: torch.device, dtype: torch.dtype) -> tuple[AutoencoderKL, str]:
    """The SD VAE (diffusers format) and its fingerprint; it must map 256x256 crops to 4x32x32 latents."""
    if not (folder / "config.json").is_file():
        raise MuseTalkWeightsError(f"the VAE is missing: no {folder / 'config.json'}. {DOWNLOAD_HINT}")
    try:
        vae = AutoencoderKL.from_pretrained(folder)
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise MuseTalkWeightsError(f"{folder} is not a usable diffusers AutoencoderKL ({error})") from None
    if vae.config.latent_channels != 4 or len(vae.config.block_out_channels) != 4:
        raise MuseTalkWeightsError(
            f"{folder}: MuseTalk needs an SD VAE with 4 latent channels and 8x downsampling "
            f"(stabilityai/sd-vae-ft-mse); this one has latent_channels {vae.config.latent_channels} "
            f"and {len(vae.config.block_out_channels)} blocks"
        )
    vae = for_inference(vae, device, dtype)
    return vae, vae_fingerprint(folder)


def load_audio_encoder(folder: Path, *, device: torch.device, dtype: torch.dtype) -> WhisperFeatureEncoder:
    """Whisper's encoder and mel filters; the feature extractor settings must be Whisper's."""
    try:
        extractor = WhisperFeatureExtractor.from_pretrained(folder)
        whisper = WhisperModel.from_pretrained(folder)
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise MuseTalkWeightsError(f"{folder} is not a usable Whisper model in transformers format ({error})") from None
    config = whisper.config
    expected = {"sampling_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH, "n_fft": N_FFT}
    for key, value in expected.items():
        if getattr(extractor, key) != value:
            raise MuseTalkWeightsError(
                f"{folder / 'preprocessor_config.json'}: {key} is {getattr(extractor, key)}, Whisper uses {value}"
            )
    if extractor.feature_size != config.num_mel_bins:
        raise MuseTalkWeightsError(
            f"{folder}: the feature extractor makes {extractor.feature_size} mel bins but the model takes "
            f"{config.num_mel_bins}"
        )
    if extractor.nb_max_frames != 2 * config.max_source_positions or config.max_source_positions % 2:
        raise MuseTalkWeightsError(
            f"{folder}: the feature extractor's {extractor.chunk_length} s window ({extractor.nb_max_frames} mel "
            f"frames) does not match the encoder's {config.max_source_positions} positions"
        )
    encoder = for_inference(whisper.encoder, device, dtype)
    return WhisperFeatureEncoder(encoder, extractor.mel_filters, device=device, dtype=dtype)


def load_musetalk(models_dir: Path, *, device: str = "auto", dtype: str = "auto") -> MuseTalkModels:
    """All of MuseTalk v1.5 from ``models_dir`` (the official layout), float16 on CUDA, float32 on CPU."""
    models_dir = Path(models_dir)
    _require(models_dir)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    audio = load_audio_encoder(models_dir / WHISPER_DIR, device=torch_device, dtype=torch_dtype)
    unet_config = _read_json(models_dir / UNET_DIR / UNET_CONFIG)
    if unet_config.get("cross_attention_dim") != audio.d_model:
        raise MuseTalkWeightsError(
            f"{models_dir / UNET_DIR / UNET_CONFIG}: cross_attention_dim is {unet_config.get('cross_attention_dim')} "
            f"but the Whisper encoder in {models_dir / WHISPER_DIR} makes {audio.d_model}-wide features "
            "(MuseTalk v1.5 uses whisper-tiny: 384)"
        )
    unet = load_unet(models_dir / UNET_DIR, device=torch_device, dtype=torch_dtype)
    vae, vae_id = load_vae(models_dir / VAE_DIR, device=torch_device, dtype=torch_dtype)
    logger.info("MuseTalk loaded from %s on %s (%s)", models_dir, torch_device, str(torch_dtype).removeprefix("torch."))
    return MuseTalkModels(unet=unet, vae=vae, audio=audio, device=torch_device, dtype=torch_dtype, vae_id=vae_id)
