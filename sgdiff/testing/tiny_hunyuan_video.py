"""A tiny random-weight HunyuanVideo pipeline (diffusers' HunyuanVideoPipeline), built fully offline, for tests.

Structurally the real pipeline (same classes, component names and folder layout as
hunyuanvideo-community/HunyuanVideo, the same scheduler config: Euler at shift 7), but every network is a few
kilobytes of random weights, so it only ever generates noise. The Llama tokenizer is made in code the way
Llama 3's is (byte-level BPE behind Llama 3's pre-tokenizer split, <|begin_of_text|> added in front), its merges
spelling whole the prompt template's words and a few prompt words: the template's system part is 95 tokens, as
with the real tokenizer, so the pipeline's crop_start cuts exactly it. The CLIP tokenizer and text model are
tiny_flux's. Nothing is downloaded.

model_index.json names the Llama tokenizer `PreTrainedTokenizerFast`, the class Llama 3 tokenizers are saved
with: transformers 5 builds `LlamaTokenizerFast` (an alias of LlamaTokenizer) anew from the vocabulary with
SentencePiece's metaspace pre-tokenizer, which splits a byte-level vocabulary's text into single characters,
so under that name diffusers would not tokenize as the file says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from sgdiff.demo.vocabulary import byte_level_alphabet
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.testing.compare import randomize_weights
from sgdiff.testing.tiny_configs import FLUX_TEXT_DIM
from sgdiff.testing.tiny_flux import make_clip_text_encoder, make_clip_tokenizer
from sgdiff.testing.tiny_qwen_image import word_merges

TEXT_DIM = 32  # Llama's hidden size (4096 in the real one) = the transformer's text_embed_dim
LATENT_CHANNELS = 4  # 16 in the real VAE

# scheduler/scheduler_config.json of hunyuanvideo-community/HunyuanVideo
HUNYUAN_VIDEO_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 7.0,
    "shift_terminal": None,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

TRANSFORMER: dict[str, Any] = {
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": TEXT_DIM,
    "pooled_projection_dim": FLUX_TEXT_DIM,  # the CLIP text model's hidden size (768 in the real one)
    "rope_theta": 256.0,
    "rope_axes_dim": (4, 6, 6),  # sums to attention_head_dim
}

# The real VAE's layout (8x spatial, 4x temporal compression: four blocks) at 8 to 16 channels
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "down_block_types": ("HunyuanVideoDownBlock3D",) * 4,
    "up_block_types": ("HunyuanVideoUpBlock3D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "scaling_factor": 0.476986,
    "spatial_compression_ratio": 8,
    "temporal_compression_ratio": 4,
    "mid_block_add_attention": True,
}

DECODER_GAIN = 3.0  # (make_vae)

# Llama 3's (the llava-llama-3-8b text encoder's) tokenizer, in small
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
BEGIN_OF_TEXT = "<|begin_of_text|>"
SPECIAL_TOKENS = [BEGIN_OF_TEXT, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>"]
# diffusers' DEFAULT_PROMPT_TEMPLATE["template"] of HunyuanVideoPipeline (its system part is 95 tokens)
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
PROMPT_WORDS = "a red blue green cube sphere cat on the table walks grass blurry photo".split()

M = TypeVar("M", bound=torch.nn.Module)


def _seeded(seed: int, make: Callable[[], M]) -> M:
    """Build a module from its own seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip


def template_words() -> list[str]:
    """The pre-tokens (byte-level spelled) of the template's text between its special tokens, and of the prompt
    words at the start of the user turn and after a space."""
    split = llama3_pre_tokenizer()
    specials = "|".join(re.escape(token) for token in SPECIAL_TOKENS)
    texts = [part for part in re.split(specials, PROMPT_TEMPLATE.replace("{}", "")) if part]
    texts += [" ".join(PROMPT_WORDS), *PROMPT_WORDS]
    words = [word for text in texts for word, _ in split.pre_tokenize_str(text)]
    return [word for word in dict.fromkeys(words) if len(word) > 1]


def make_llama_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte char, the merges' products, then the special tokens; <|begin_of_text|>
    before every text; padded on the right with <pad> (as diffusers' pipeline needs for its crop)."""
    merges = word_merges(template_words())
    tokens = [*byte_level_alphabet(), *("".join(pair) for pair in merges)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = llama3_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A",
        pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B",
        special_tokens=[(BEGIN_OF_TEXT, vocab[BEGIN_OF_TEXT])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BEGIN_OF_TEXT,
        eos_token="<|end_of_text|>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=131072,
    )


def make_llama_text_encoder(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaModel:
    """Three layers: the pipeline reads the hidden state two layers before the last (the first layer's output).
    Every weight random and of order one (compare.randomize_weights), the embeddings too: the prompt's words
    move the video far beyond the parity tolerance."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},  # Llama 3's theta
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    def make() -> LlamaModel:
        model = LlamaModel(config)
        randomize_weights(model, seed, unscaled=("embed_tokens",))
        return model

    return _seeded(seed, make)


def make_transformer(seed: int) -> HunyuanVideoTransformer3DModel:
    """Every weight random and of order one (compare.randomize_weights)."""
    return _seeded(seed, lambda: randomize_weights(HunyuanVideoTransformer3DModel(**TRANSFORMER), seed))


def make_vae(seed: int) -> AutoencoderKLHunyuanVideo:
    """diffusers' initial weights, the decoder's last convolution scaled up (DECODER_GAIN): a random decoder
    makes videos of little contrast, which would squeeze the text's effect on the pixels towards the parity
    tolerance."""
    vae = _seeded(seed, lambda: AutoencoderKLHunyuanVideo(**VAE))
    with torch.no_grad():
        vae.decoder.conv_out.conv.weight.mul_(DECODER_GAIN)
        vae.decoder.conv_out.conv.bias.mul_(DECODER_GAIN)
    return vae


def make_hunyuan_video_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    """Assemble the tiny pipeline in memory (nothing is written)."""
    tokenizer, tokenizer_2 = make_llama_tokenizer(), make_clip_tokenizer()
    return HunyuanVideoPipeline(
        text_encoder=make_llama_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        transformer=make_transformer(seed + 2),
        vae=make_vae(seed + 3),
        scheduler=FlowMatchEulerDiscreteScheduler(**HUNYUAN_VIDEO_SCHEDULER_CONFIG),
        text_encoder_2=_seeded(seed + 1, lambda: make_clip_text_encoder(tokenizer_2, seed + 1)),
        tokenizer_2=tokenizer_2,
    )


def build_tiny_hunyuan_video(out_dir: str | Path, seed: int = 0) -> Path:
    """Tiny random-weight HunyuanVideo pipeline, saved in diffusers format (safetensors) under out_dir."""
    out = Path(out_dir)
    pipe = make_hunyuan_video_pipeline(seed)
    with quiet_libraries():
        pipe.save_pretrained(out, safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]  # (transformers 5 records TokenizersBackend)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
