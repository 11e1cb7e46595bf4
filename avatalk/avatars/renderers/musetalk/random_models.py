"""MuseTalk networks with random weights, in the real v1.5 shapes or smaller ones, for benchmarks and tests.

Inference speed does not depend on the weights' values, so the benchmark
times the real shapes without the real weights; the tests write networks
in the official file layout and load them with the real loader, so
loading, features, scheduling and pasting are exercised end to end on a
CPU. Three sizes:

- ``full``: the real UNet, SD VAE and Whisper-tiny (850 M + 84 M + 38 M parameters);
- ``reduced``: the real Whisper-tiny (so audio features are full size) with
  the UNet and VAE of the same block structure at reduced widths, small
  enough for a 2-core CI machine;
- ``tiny``: everything reduced, Whisper included (d_model 32).

The code never downloads weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from avatalk.avatars.renderers.musetalk.features import WhisperFeatureEncoder
from avatalk.avatars.renderers.musetalk.loader import (
    SD_VAE_CONFIG,
    UNET_CONFIG,
    UNET_DIR,
    UNET_V15_CONFIG,
    UNET_WEIGHTS,
    VAE_DIR,
    WHISPER_DIR,
    WHISPER_TINY_CONFIG,
    MuseTalkModels,
    for_inference,
)

Size = Literal["full", "reduced", "tiny"]

#: Token ids a tiny vocabulary can hold (Whisper's defaults point past it).
_TINY_TOKENS = {"vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 3}


def model_configs(size: Size) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """UNet, VAE and Whisper configs: the real ones (``full``) or the same structure with smaller widths.

    Every size keeps Whisper's 30 s window (1500 positions): the features
    depend on it, and the official recipe pads every clip to it.
    """
    if size == "full":
        return dict(UNET_V15_CONFIG), dict(SD_VAE_CONFIG), dict(WHISPER_TINY_CONFIG)
    width = 32 if size == "tiny" else int(WHISPER_TINY_CONFIG["d_model"])
    unet = dict(
        UNET_V15_CONFIG,
        block_out_channels=[16, 16, 32, 32],
        layers_per_block=1,
        attention_head_dim=2,
        norm_num_groups=8,
        cross_attention_dim=width,
    )
    vae = dict(SD_VAE_CONFIG, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)
    if size == "reduced":
        return unet, vae, dict(WHISPER_TINY_CONFIG)
    whisper = dict(
        WHISPER_TINY_CONFIG,
        d_model=width,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width,
        decoder_layers=1,
        max_target_positions=16,
        **_TINY_TOKENS,
    )
    return unet, vae, whisper


def _unet(config: dict[str, Any]) -> UNet2DConditionModel:
    model: UNet2DConditionModel = UNet2DConditionModel.from_config(
        {k: v for k, v in config.items() if not k.startswith("_")}
    )
    return model


def build_models(
    size: Size, *, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> MuseTalkModels:
    """Random-weight models built directly on ``device`` (no files), as the loader would return them."""
    unet_config, vae_config, whisper_config = model_configs(size)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = _unet(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        encoder = WhisperEncoder(WhisperConfig(**whisper_config))
    extractor = WhisperFeatureExtractor(feature_size=whisper_config["num_mel_bins"])
    audio = WhisperFeatureEncoder(
        for_inference(encoder, device, dtype), extractor.mel_filters, device=device, dtype=dtype
    )
    return MuseTalkModels(
        unet=for_inference(unet, device, dtype),
        vae=for_inference(vae, device, dtype),
        audio=audio,
        device=device,
        dtype=dtype,
        vae_id=f"random-{size}-{seed}",
    )


def write_layout(models_dir: Path, size: Size = "tiny", *, seed: int = 0) -> Path:
    """Random-weight models saved in the official layout under ``models_dir`` (which is returned)."""
    unet_config, vae_config, whisper_config = model_configs(size)
    torch.manual_seed(seed)
    models_dir = Path(models_dir)
    (models_dir / UNET_DIR).mkdir(parents=True, exist_ok=True)
    torch.save(_unet(unet_config).state_dict(), models_dir / UNET_DIR / UNET_WEIGHTS)
    config = {"_class_name": "UNet2DConditionModel", **{k: v for k, v in unet_config.items() if k != "_class_name"}}
    (models_dir / UNET_DIR / UNET_CONFIG).write_text(json.dumps(config, indent=2))
    AutoencoderKL.from_config(vae_config).save_pretrained(models_dir / VAE_DIR)
    WhisperModel(WhisperConfig(**whisper_config)).save_pretrained(models_dir / WHISPER_DIR)
    extractor = WhisperFeatureExtractor(feature_size=whisper_config["num_mel_bins"])
    extractor.save_pretrained(models_dir / WHISPER_DIR)
    return models_dir
