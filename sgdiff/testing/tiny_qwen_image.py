"""A tiny random-weight Qwen-Image pipeline, built fully offline, for tests.

Structurally the real diffusers QwenImagePipeline (same classes, component names and folder layout as
Qwen/Qwen-Image, the same scheduler config), but every network is a few kilobytes of random weights, so
it only ever generates noise. The Qwen2 tokenizer is made in code from an in-memory byte-level vocabulary
whose merges spell the chat template's words whole: the template's system turn is 34 tokens, as in
Qwen's own tokenizer, so the pipeline's prefix dropping cuts exactly the system turn. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from sgdiff.demo.vocabulary import byte_level_alphabet
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.testing.compare import randomize_weights

TEXT_DIM = 32  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim
LATENT_CHANNELS = 4  # 16 in the real VAE

# scheduler/scheduler_config.json of Qwen/Qwen-Image
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 4 * LATENT_CHANNELS,  # 2x2 latent patches packed
    "out_channels": LATENT_CHANNELS,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TEXT_DIM,
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim
}

# The real VAE's layout (8x spatial compression: three downsamples) at base_dim 4; the latent statistics are
# the first entries of the real ones, so a wrong (de)normalisation shows in comparisons.
VAE: dict[str, Any] = {
    "base_dim": 4,
    "z_dim": LATENT_CHANNELS,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558],
}

DECODER_GAIN = 3.0  # (make_vae)

TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": TEXT_DIM,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},  # head_dim / 2
}

VISION_CONFIG: dict[str, Any] = {  # never run by text-to-image; the Edit pipelines' image input goes through it
    "depth": 1,
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_heads": 2,
    "out_hidden_size": TEXT_DIM,
    "fullatt_block_indexes": [0],
}

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]  # the chat template's; <|endoftext|> is Qwen2Tokenizer's own
# Whole tokens in the vocabulary ("Ġ" is a space in byte-level BPE): the template's words, then a few prompt words
WORDS = [
    "system", "user", "assistant", "Describe", "Ġthe", "Ġimage", "Ġby", "Ġdetailing", "Ġcolor", "Ġshape",
    "Ġsize", "Ġtexture", "Ġquantity", "Ġtext", "Ġspatial", "Ġrelationships", "Ġof", "Ġobjects", "Ġand",
    "Ġbackground", "Ġred", "Ġblue", "Ġgreen", "Ġcube", "Ġsphere", "Ġon", "Ġtable", "Ġblurry", "Ġphoto",
]  # fmt: skip

M = TypeVar("M", bound=torch.nn.Module)


def _seeded(seed: int, make: Callable[[], M]) -> M:
    """Build a module from its own seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that build each word from its first character, one character at a time."""
    merges: list[tuple[str, str]] = []
    for word in words:
        for i in range(1, len(word)):
            if (word[:i], word[i]) not in merges:
                merges.append((word[:i], word[i]))
    return merges


def make_qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE: <|endoftext|>, every byte char, the merges' products; the template's specials."""
    merges = word_merges(WORDS)
    tokens = ["<|endoftext|>", *byte_level_alphabet(), *("".join(pair) for pair in merges)]
    vocab = {token: i for i, token in enumerate(tokens)}
    # tokenizers 0.23 wants merges as (left, right) tuples, not "left right" strings
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]
        extra_special_tokens=SPECIAL_TOKENS,
        model_max_length=131072,
    )


def make_text_encoder(tokenizer: Qwen2Tokenizer, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    end_of_text, im_end = (tokenizer.get_vocab()[token] for token in ("<|endoftext|>", "<|im_end|>"))
    ids = {"bos_token_id": end_of_text, "eos_token_id": im_end, "pad_token_id": end_of_text}
    config = Qwen2_5_VLConfig(
        text_config={**TEXT_CONFIG, "vocab_size": len(tokenizer), **ids}, vision_config=VISION_CONFIG
    )
    return _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config))


def make_transformer(seed: int) -> QwenImageTransformer2DModel:
    """Every weight random and of order one (compare.randomize_weights): the text moves the image far
    beyond the parity tolerance (some of diffusers' initial weights are zeros)."""
    return _seeded(seed, lambda: randomize_weights(QwenImageTransformer2DModel(**TRANSFORMER), seed))


def make_vae(seed: int) -> AutoencoderKLQwenImage:
    """diffusers' initial weights, the decoder's last convolution scaled up (DECODER_GAIN): a random decoder
    makes images of little contrast (a pixel std of 16 of 255 at gain 1, about 50 here), which would
    squeeze the text's effect on the pixels towards the parity tolerance."""
    vae = _seeded(seed, lambda: AutoencoderKLQwenImage(**VAE))
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(DECODER_GAIN)
        vae.decoder.conv_out.bias.mul_(DECODER_GAIN)
    return vae


def make_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """Assemble the tiny pipeline in memory (nothing is written)."""
    tokenizer = make_qwen_tokenizer()
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=make_vae(seed + 3),
        text_encoder=make_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        transformer=make_transformer(seed + 2),
    )


def build_tiny_qwen_image(out_dir: str | Path, seed: int = 0) -> Path:
    """Tiny random-weight Qwen-Image pipeline, saved in diffusers format (safetensors) under out_dir."""
    out = Path(out_dir)
    pipe = make_qwen_image_pipeline(seed)
    with quiet_libraries():
        pipe.save_pretrained(out, safe_serialization=True)
    return out
