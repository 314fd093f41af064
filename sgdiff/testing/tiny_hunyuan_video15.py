"""Tiny random-weight HunyuanVideo-1.5 pipelines (diffusers' HunyuanVideo15Pipeline, text to video, and
HunyuanVideo15ImageToVideoPipeline, image to video), built fully offline, for tests.

Structurally the real pipelines (same classes, component names and folder layout as
hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v / -480p_i2v, their scheduler config: Euler at shift
5, their guider: CFG 6), but every network is a few kilobytes of random weights, so they only ever generate noise.
The Qwen2 tokenizer is made in code (byte-level BPE behind Qwen2's pre-tokenizer) with merges spelling whole the
words of the prompt template and a few prompt words, and Qwen2.5-VL's chat template: the template up to the
prompt is 108 tokens, as with Qwen's own tokenizer, so the pipelines' crop (prompt_template_encode_start_idx)
cuts exactly it. ByT5's tokenizer needs no vocabulary file. The VAE keeps the real one's layout (16x spatial,
4x temporal compression). Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from tokenizers import Regex, pre_tokenizers
from transformers import (
    ByT5Tokenizer,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    Qwen2Tokenizer,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from sgdiff.demo.vocabulary import byte_level_alphabet
from sgdiff.families.hunyuan_video15.text import PROMPT_TEMPLATE
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.testing.compare import randomize_weights
from sgdiff.testing.tiny_qwen_image import word_merges

TEXT_DIM = 32  # Qwen2.5-VL's hidden size (3584 in the real one) = the transformer's text_embed_dim
GLYPH_DIM = 16  # ByT5's d_model (1472)
IMAGE_DIM = 16  # SigLIP's hidden size (1152)
LATENT_CHANNELS = 4  # 32 in the real VAE
TARGET_SIZE = 48  # pixels: the size a request without one gets (640 for 480p)

# scheduler/scheduler_config.json of the 480p checkpoints: diffusers' defaults at shift 5
SCHEDULER_CONFIG: dict[str, Any] = {"shift": 5.0}
GUIDANCE_SCALE = 6.0  # guider/guider_config.json of the released (not CFG-distilled) checkpoints

TRANSFORMER: dict[str, Any] = {
    "in_channels": 2 * LATENT_CHANNELS + 1,  # the noise, the condition latents and their mask
    "out_channels": LATENT_CHANNELS,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 1,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "text_embed_dim": TEXT_DIM,
    "text_embed_2_dim": GLYPH_DIM,
    "image_embed_dim": IMAGE_DIM,
    "rope_theta": 256.0,
    "rope_axes_dim": (4, 6, 6),  # sums to attention_head_dim
    "target_size": TARGET_SIZE,
}

# The real VAE's layout (five blocks: 16x spatial, 4x temporal compression) at 8 to 16 channels
VAE: dict[str, Any] = {
    "latent_channels": LATENT_CHANNELS,
    "block_out_channels": (8, 8, 16, 16, 16),
    "layers_per_block": 1,
    "spatial_compression_ratio": 16,
    "temporal_compression_ratio": 4,
    "scaling_factor": 1.03682,
}
DECODER_GAIN = 3.0  # (make_vae)

SIGLIP: dict[str, Any] = {  # 32x32 pixels in 8x8 patches: 16 image tokens (SigLIP-so400m: 729)
    "hidden_size": IMAGE_DIM,
    "intermediate_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]  # the chat template's; <|endoftext|> is Qwen2Tokenizer's own
# Qwen2.5-VL's chat template, for text messages
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT_WORDS = "a red blue green cube sphere cat on the table walks grass blurry photo sign that says hello".split()
SPACES = "ĠĠĠĠĠĠĠĠ"  # the template's run of 8 spaces, one token in Qwen's vocabulary (as here)

M = TypeVar("M", bound=torch.nn.Module)


def _seeded(seed: int, make: Callable[[], M]) -> M:
    """Build a module from its own seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def randomized(model: M, seed: int, unscaled: tuple[str, ...] = ()) -> M:
    """`model` with every weight random and of order one (compare.randomize_weights)."""
    randomize_weights(model, seed, unscaled)
    return model


def template_words() -> list[str]:
    """The pre-tokens (byte-level spelled) of the template's text between its special tokens, and of the prompt
    words at the start of the user turn and after a space; runs of spaces aside (spaces_merges)."""
    split = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    texts = [part for token in SPECIAL_TOKENS for part in PROMPT_TEMPLATE.replace("{}", "").split(token)]
    texts += [" ".join(PROMPT_WORDS), *PROMPT_WORDS]
    words = [word for text in texts for word, _ in split.pre_tokenize_str(text)]
    return [word for word in dict.fromkeys(words) if len(word) > 1 and set(word) != {"Ġ"}]


def make_qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE: <|endoftext|>, every byte char, the merges' products (the template's words whole, its runs
    of 8 spaces as 2, 4, then 8); the chat template's specials."""
    merges = [("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("ĠĠĠĠ", "ĠĠĠĠ"), *word_merges(template_words())]
    tokens = ["<|endoftext|>", *byte_level_alphabet(), *("".join(pair) for pair in merges)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # (tokenizers 0.23 wants (left, right) tuples)
        extra_special_tokens=SPECIAL_TOKENS,
        model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_qwen_text_encoder(tokenizer: Qwen2Tokenizer, seed: int) -> Qwen2_5_VLTextModel:
    """Four layers: the pipeline reads the hidden state two layers before the last (the second layer's output).
    Every weight random and of order one (compare.randomize_weights), the embeddings too: a prompt's words move
    the video far beyond the parity tolerance."""
    vocab = tokenizer.get_vocab()
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
        bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return _seeded(seed, lambda: randomized(Qwen2_5_VLTextModel(config), seed, unscaled=("embed_tokens",)))


def make_byt5_encoder(tokenizer: ByT5Tokenizer, seed: int) -> T5EncoderModel:
    """ByT5-small's kind of T5 (gated GELU, relative positions) in small, every weight random (embeddings of
    order one): a quoted word moves the video far beyond the parity tolerance."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=GLYPH_DIM,
        d_kv=8,
        d_ff=24,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return _seeded(seed, lambda: randomized(T5EncoderModel(config), seed, unscaled=("shared",)))


def make_image_encoder(seed: int) -> SiglipVisionModel:
    return _seeded(seed, lambda: randomized(SiglipVisionModel(SiglipVisionConfig(**SIGLIP)), seed))


def make_transformer(seed: int, task_type: str, **changes: Any) -> HunyuanVideo15Transformer3DModel:
    """Every weight random and of order one (compare.randomize_weights; the condition kinds' embeddings too).
    `changes`: config fields (use_meanflow=True: as the step-distilled 480p image-to-video checkpoint)."""
    model = HunyuanVideo15Transformer3DModel(**{**TRANSFORMER, **changes}, task_type=task_type)
    return _seeded(seed, lambda: randomized(model, seed, unscaled=("cond_type_embed",)))


def make_vae(seed: int) -> AutoencoderKLHunyuanVideo15:
    """diffusers' initial weights, the decoder's last convolution scaled up (DECODER_GAIN): a random decoder
    makes videos of little contrast, which would squeeze the inputs' effect on the pixels towards the parity
    tolerance."""
    vae = _seeded(seed, lambda: AutoencoderKLHunyuanVideo15(**VAE))
    with torch.no_grad():
        vae.decoder.conv_out.conv.weight.mul_(DECODER_GAIN)
        vae.decoder.conv_out.conv.bias.mul_(DECODER_GAIN)
    return vae


def make_hunyuan_video15_pipeline(
    image_to_video: bool = False, seed: int = 0, **transformer: Any
) -> HunyuanVideo15Pipeline | HunyuanVideo15ImageToVideoPipeline:
    """Assemble the tiny pipeline in memory (nothing is written); `transformer`: config changes."""
    tokenizer, tokenizer_2 = make_qwen_tokenizer(), ByT5Tokenizer()
    parts: dict[str, Any] = dict(
        text_encoder=make_qwen_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        transformer=make_transformer(seed + 2, "i2v" if image_to_video else "t2v", **transformer),
        vae=make_vae(seed + 3),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        text_encoder_2=make_byt5_encoder(tokenizer_2, seed + 1),
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=GUIDANCE_SCALE),
    )
    if not image_to_video:
        return HunyuanVideo15Pipeline(**parts)
    size = {"height": SIGLIP["image_size"], "width": SIGLIP["image_size"]}
    return HunyuanVideo15ImageToVideoPipeline(
        **parts, image_encoder=make_image_encoder(seed + 4), feature_extractor=SiglipImageProcessorPil(size=size)
    )


def build_tiny_hunyuan_video15(
    out_dir: str | Path, image_to_video: bool = False, seed: int = 0, **transformer: Any
) -> Path:
    """Tiny random-weight HunyuanVideo-1.5 pipeline (`image_to_video`: the image-to-video one), saved in diffusers
    format (safetensors) under out_dir; `transformer`: config changes (use_meanflow=True)."""
    out = Path(out_dir)
    pipe = make_hunyuan_video15_pipeline(image_to_video, seed, **transformer)
    with quiet_libraries():
        pipe.save_pretrained(out, safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text())
    if image_to_video:  # (without torchvision transformers 5 records its PIL twin; the real repos name this one)
        index["feature_extractor"] = ["transformers", "SiglipImageProcessor"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
