"""Tiny random text-to-image pipelines, built offline from diffusers / transformers configs.

No diffusion weights ship on PyPI, so tests, the CPU benchmark and a first try of
``neural-quantize quantize-pipeline --pipeline tiny-unet`` use these: the real pipeline classes
(``StableDiffusionPipeline`` with a ``UNet2DConditionModel`` and a CLIP text encoder,
``PixArtAlphaPipeline`` with a ``PixArtTransformer2DModel`` and a T5 encoder, ``FluxPipeline`` with
a ``FluxTransformer2DModel``, CLIP and T5 encoders), a real VAE and scheduler, random weights
(seeded) and a word-level tokenizer over the shipped prompts' words.
Their images are noise-like, but the sampling trajectories are real: every step feeds the
denoiser its own previous output, which is what calibration needs.
"""

from __future__ import annotations

import re

import torch

from neural_quantization.diffusion.calibration import DEFAULT_PROMPTS

TINY_PIPELINES = ("tiny-unet", "tiny-dit", "tiny-flux")
#: image side in pixels (the VAE halves it once: latents 16 × 16)
TINY_RESOLUTION = 32
TEXT_LENGTH = 16


def tiny_tokenizer():
    """A word-level fast tokenizer (lower-cased words of the shipped prompts, [UNK] for the rest)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for prompt in DEFAULT_PROMPTS for w in re.findall(r"\w+", prompt.lower())})
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                           special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", model_max_length=TEXT_LENGTH)


def _vae(latent_channels: int = 4, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=16, sample_size=TINY_RESOLUTION, **kwargs)


def tiny_unet_pipeline(seed: int = 0):
    """``StableDiffusionPipeline``: a 2-level UNet (cross-attention in the lower level and the middle),
    a 2-layer CLIP text encoder, DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=TINY_RESOLUTION // 2, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=16,
        attention_head_dim=8, use_linear_projection=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=TEXT_LENGTH, bos_token_id=2, eos_token_id=3, pad_token_id=0))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_dit_pipeline(seed: int = 0):
    """``PixArtAlphaPipeline``: a 2-block PixArt transformer (adaLN-single, cross-attention), a
    2-layer T5 encoder, DDIM."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=TINY_RESOLUTION // 2, num_layers=2, attention_head_dim=8, num_attention_heads=4, in_channels=4,
        out_channels=8, patch_size=2, cross_attention_dim=32, caption_channels=32, norm_num_groups=16,
        use_additional_conditions=False)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, pad_token_id=0, eos_token_id=3))
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=False)
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=_vae(),
                               transformer=transformer.eval(), scheduler=scheduler)


def tiny_flux_pipeline(seed: int = 0):
    """``FluxPipeline``: a FLUX.1-dev-shaped transformer (one double-stream and one single-stream
    block, guidance embedding, 3-axis RoPE), a 2-layer CLIP and a 2-layer T5 encoder, flow-matching
    Euler. The VAE has 8 latent channels, so the packed 2 × 2 patches give the transformer 32 input
    features (a multiple of the GGUF block of 32; FLUX.1's 16 channels give 64)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=TEXT_LENGTH, bos_token_id=2, eos_token_id=3, pad_token_id=0))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_heads=4, pad_token_id=0, eos_token_id=3))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(8, shift_factor=0.0),
                        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
                        tokenizer_2=tiny_tokenizer(), transformer=transformer.eval())


def tiny_pipeline(name: str, seed: int = 0):
    if name == "tiny-unet":
        return tiny_unet_pipeline(seed)
    if name == "tiny-dit":
        return tiny_dit_pipeline(seed)
    if name == "tiny-flux":
        return tiny_flux_pipeline(seed)
    raise ValueError(f"unknown tiny pipeline {name!r}; use one of {', '.join(TINY_PIPELINES)}")
