"""Tiny random-weight Qwen-Image pipelines, built fully offline, for tests: text to image, and the Edit
pipelines (QwenImageEditPipeline: one input image; QwenImageEditPlusPipeline: several).

Structurally the real diffusers pipelines (same classes, component names and folder layout as
Qwen/Qwen-Image and Qwen/Qwen-Image-Edit(-2509), the same scheduler config), but every network is a few
kilobytes of random weights, so they only ever generate noise. The Qwen2 tokenizer is made in code from an
in-memory byte-level vocabulary whose merges spell the chat templates' words whole: the text-to-image
template's system turn is 34 tokens and the edit template's 64, as in Qwen's own tokenizer, so the
pipelines' prefix dropping cuts exactly the system turn. The Edit checkpoints' processor/ folder holds that
tokenizer and a Qwen2-VL image processor config (patches of 4 pixels instead of 14, at most 64x64 pixels
an image) for a vision tower of one layer. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

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

# The Edit checkpoints' VAE: 16x spatial compression (a fourth downsample) and one channel at full resolution,
# since the Edit pipelines encode every input image at about 1024x1024 pixels whatever the output size (64x64
# latents: 1024 image tokens); the real VAE's 8x would give 4096 tokens, and its full-resolution stage would
# take most of a test's time on a CPU
EDIT_VAE: dict[str, Any] = {
    **VAE,
    "base_dim": 1,
    "dim_mult": [1, 2, 4, 4, 4],
    "temperal_downsample": [False, True, True, False],
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

# The edit templates (diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline): their words whole, as Qwen's
# tokenizer has them, and " user" (the merges above spell "user" first, so " user" needs a merge of its own)
EDIT_WORDS = [
    "Ġkey", "Ġfeatures", "Ġinput", "Ġ(", "color", "),", "Ġthen", "Ġexplain", "Ġhow", "'s", "Ġinstruction",
    "Ġshould", "Ġalter", "Ġor", "Ġmodify", "ĠGenerate", "Ġa", "Ġnew", "Ġthat", "Ġmeets", "Ġrequirements",
    "Ġwhile", "Ġmaintaining", "Ġconsistency", "Ġwith", "Ġoriginal", "Ġwhere", "Ġappropriate", "Picture",
]  # fmt: skip
EDIT_MERGES = [("Ġ", "user")]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # Qwen2.5-VL's

EDIT_VISION_CONFIG: dict[str, Any] = {**VISION_CONFIG, "patch_size": 4}  # (Qwen2.5-VL's: 14)

# processor/preprocessor_config.json: Qwen2.5-VL's image processor at 4-pixel patches, images scaled to at most
# 64x64 pixels (8x8 merged patches: 64 image tokens in the prompt; Qwen's: up to 16384)
IMAGE_PROCESSOR: dict[str, Any] = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "patch_size": EDIT_VISION_CONFIG["patch_size"],
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_pixels": 16 * 16,
    "max_pixels": 64 * 64,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,  # bicubic
}

EDIT_PIPELINES = {"edit": QwenImageEditPipeline, "edit-plus": QwenImageEditPlusPipeline}

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


def make_qwen_tokenizer(edit: bool = False) -> Qwen2Tokenizer:
    """Byte-level BPE: <|endoftext|>, every byte char, the merges' products; the template's specials.
    `edit`: the edit templates' words and the vision tokens too (a vocabulary of its own)."""
    merges = word_merges(WORDS + EDIT_WORDS) + EDIT_MERGES if edit else word_merges(WORDS)
    tokens = ["<|endoftext|>", *byte_level_alphabet(), *("".join(pair) for pair in merges)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    # tokenizers 0.23 wants merges as (left, right) tuples, not "left right" strings
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]
        extra_special_tokens=SPECIAL_TOKENS + VISION_TOKENS if edit else SPECIAL_TOKENS,
        model_max_length=131072,
    )


def make_text_encoder(tokenizer: Qwen2Tokenizer, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    """With the vision tokens in `tokenizer` (the edit one): a vision tower of 4-pixel patches and the
    config's ids of the tokens its image placeholders use."""
    vocab = tokenizer.get_vocab()
    end_of_text, im_end = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    ids = {"bos_token_id": end_of_text, "eos_token_id": im_end, "pad_token_id": end_of_text}
    vision: dict[str, Any] = {}
    if "<|image_pad|>" in vocab:  # the edit tokenizer
        vision = {
            "image_token_id": vocab["<|image_pad|>"],
            "video_token_id": vocab["<|video_pad|>"],
            "vision_start_token_id": vocab["<|vision_start|>"],
            "vision_end_token_id": vocab["<|vision_end|>"],
        }
    config = Qwen2_5_VLConfig(
        text_config={**TEXT_CONFIG, "vocab_size": len(tokenizer), **ids},
        vision_config=EDIT_VISION_CONFIG if vision else VISION_CONFIG,
        **vision,
    )
    return _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config))


def make_transformer(seed: int, **changes: Any) -> QwenImageTransformer2DModel:
    """Every weight random and of order one (compare.randomize_weights): the text moves the image far
    beyond the parity tolerance (some of diffusers' initial weights are zeros). `changes`: config fields
    (zero_cond_t for Qwen-Image-Edit-2511)."""
    return _seeded(seed, lambda: randomize_weights(QwenImageTransformer2DModel(**TRANSFORMER, **changes), seed))


def make_vae(seed: int, config: dict[str, Any] = VAE) -> AutoencoderKLQwenImage:
    """diffusers' initial weights, the decoder's last convolution scaled up (DECODER_GAIN): a random decoder
    makes images of little contrast (a pixel std of 16 of 255 at gain 1, about 50 here), which would
    squeeze the text's effect on the pixels towards the parity tolerance."""
    vae = _seeded(seed, lambda: AutoencoderKLQwenImage(**config))
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


def build_tiny_qwen_image_edit(out_dir: str | Path, variant: str = "edit", seed: int = 0, **transformer: Any) -> Path:
    """Tiny random-weight QwenImageEditPipeline (`variant` "edit") or QwenImageEditPlusPipeline ("edit-plus"),
    saved in diffusers format under out_dir; `transformer`: config changes (zero_cond_t=True: as
    Qwen-Image-Edit-2511). Its processor/ folder (tokenizer, preprocessor_config.json) is written here: the
    Qwen2VLProcessor object needs a video processor, which transformers builds only with torchvision."""
    out = Path(out_dir)
    tokenizer = make_qwen_tokenizer(edit=True)
    pipe = EDIT_PIPELINES[variant](
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=make_vae(seed + 3, EDIT_VAE),
        text_encoder=make_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        processor=None,
        transformer=make_transformer(seed + 2, **transformer),
    )
    with quiet_libraries():
        pipe.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out / "processor")
    (out / "processor" / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR, indent=2))
    index = json.loads((out / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


class ImagesOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """transformers' Qwen2VLProcessor without its video processor (which needs torchvision): what diffusers'
    Edit pipelines call, for references built on a machine without torchvision. Images and text only."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def load_reference_processor(folder: str | Path) -> Qwen2VLProcessor:
    """The Qwen2VLProcessor of a checkpoint's processor/ folder, as diffusers' pipelines call it."""
    import transformers

    with quiet_libraries():  # (without torchvision, transformers falls back to Qwen2VLImageProcessorPil)
        image_processor = transformers.Qwen2VLImageProcessor.from_pretrained(folder)
        tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    return ImagesOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
