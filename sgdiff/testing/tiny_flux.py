"""Tiny random-weight FLUX.1 pipeline, built fully offline, for tests.

The model is structurally a real FLUX.1 pipeline (same classes, same folder layout
as the black-forest-labs repos, same scheduler configs) but every network is a few
kilobytes of random weights (the architectures of tiny_configs.py), so it only ever
generates noise. Tokenizers are made in code from an in-memory vocabulary; nothing is
downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from sgdiff.demo.vocabulary import byte_level_alphabet
from sgdiff.models.repo_configs import FLUX_SCHEDULER_CONFIGS
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.testing.tiny_configs import FLUX_CLIP, FLUX_T5, FLUX_TRANSFORMER, FLUX_VAE

CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r</w>"), ("o", "n</w>")]
T5_WORDS = ["the", "a", "an", "of", "on", "in", "and", "red", "cube", "table", "photo"]


def make_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE: every byte char, its `</w>` form, a few merges, then the two specials."""
    chars = byte_level_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in CLIP_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # tokenizers 0.23 wants merges as (left, right) tuples, not "left right" strings
    return CLIPTokenizer(vocab=vocab, merges=list(CLIP_MERGES), model_max_length=77)  # type: ignore[arg-type]


def make_t5_tokenizer() -> T5Tokenizer:
    """Unigram: `<pad>`=0, `</s>`=1, `<unk>`=2, `▁`, every printable ASCII char, a few whole words."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -5.0) for c in range(ord("!"), ord("~") + 1)]
    pieces += [("▁" + w, -3.0) for w in T5_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def make_clip_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **FLUX_CLIP,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def make_t5_text_encoder(tokenizer: T5Tokenizer, seed: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,  # type: ignore[call-arg]  # (a PreTrainedConfig keyword)
        **FLUX_T5,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def make_transformer(variant: str, seed: int) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(guidance_embeds=variant == "dev", **FLUX_TRANSFORMER).eval()


def make_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**FLUX_VAE).eval()


def make_pipeline(variant: str = "dev", seed: int = 0) -> FluxPipeline:
    """Assemble the tiny pipeline in memory (nothing is written)."""
    if variant not in FLUX_SCHEDULER_CONFIGS:
        raise ValueError(f"variant must be one of {sorted(FLUX_SCHEDULER_CONFIGS)}, got {variant!r}")
    tokenizer, tokenizer_2 = make_clip_tokenizer(), make_t5_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIGS[variant]),
        text_encoder=make_clip_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        text_encoder_2=make_t5_text_encoder(tokenizer_2, seed + 1),
        tokenizer_2=tokenizer_2,
        transformer=make_transformer(variant, seed + 2),
        vae=make_vae(seed + 3),
    )


def _shard_transformer(transformer: FluxTransformer2DModel, folder: Path, shards: int = 3) -> None:
    """Re-save the transformer as several safetensors shards plus an index, like FLUX.1-dev."""
    total = sum(p.numel() * p.element_size() for p in transformer.state_dict().values())
    shutil.rmtree(folder)
    transformer.save_pretrained(folder, safe_serialization=True, max_shard_size=total // shards + 1)


def build_tiny_flux(out_dir: str | Path, variant: str = "dev", seed: int = 0, shard_transformer: bool = False) -> Path:
    """Build a tiny random-weight FLUX.1 pipeline, save it in diffusers format (safetensors) under out_dir."""
    out = Path(out_dir)
    pipe = make_pipeline(variant, seed)
    with quiet_libraries():
        pipe.save_pretrained(out, safe_serialization=True)
        if shard_transformer:
            _shard_transformer(pipe.transformer, out / "transformer")
    return out
