"""Checkpoints on disk for the end-to-end benchmark: a full-size FLUX.1, Wan2.1-T2V-1.3B or Qwen-Image with
random weights in diffusers' layout (speed does not depend on weight values; no weights can be downloaded
here), or the tests' tiny one. Tokenizers are made in code (their ids fit the real vocabularies); every
other part has the real architecture, in bf16 (Wan's VAE in float32, as the Wan-AI repos store it).
Full size needs a CUDA GPU and disk: FLUX.1 ~34 GB, Wan2.1-1.3B ~14 GB, Qwen-Image ~58 GB (its 20B
transformer, Qwen2.5-VL-7B with its vision tower in transformers-4 names, as Qwen/Qwen-Image stores them)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from sgdiff.bench.parts import BENCH_MODELS, CLIP_L, FLUX_VAE, T5_XXL, UMT5_XXL, diffusers_kwargs, seeded
from sgdiff.errors import UserError
from sgdiff.models.repo_configs import FLUX_SCHEDULER_CONFIGS, WAN_SCHEDULER_CONFIG
from sgdiff.testing.tiny_flux import make_clip_tokenizer, make_t5_tokenizer

CHECKPOINT_MODELS = ("flux.1-dev", "flux.1-schnell", "wan2.1-t2v-1.3b", "qwen-image")


def flux_pipeline(name: str, device: torch.device):
    """diffusers' FluxPipeline of `name` at full size, random bf16 weights, on `device`."""
    import diffusers
    import transformers

    bf16 = torch.bfloat16
    tokenizer, tokenizer_2 = make_clip_tokenizer(), make_t5_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    clip_config = transformers.CLIPTextConfig(**CLIP_L, **ids)
    transformer_kwargs = diffusers_kwargs(BENCH_MODELS[name].config)
    variant = "dev" if name == "flux.1-dev" else "schnell"
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIGS[variant]),
        tokenizer=tokenizer,
        text_encoder=seeded(1, bf16, device, lambda: transformers.CLIPTextModel(clip_config)),
        tokenizer_2=tokenizer_2,
        text_encoder_2=seeded(2, bf16, device, lambda: transformers.T5EncoderModel(transformers.T5Config(**T5_XXL))),
        transformer=seeded(0, bf16, device, lambda: diffusers.FluxTransformer2DModel(**transformer_kwargs)),
        vae=seeded(4, bf16, device, lambda: diffusers.AutoencoderKL(**FLUX_VAE)),
    )


def wan_pipeline(name: str, device: torch.device):
    """diffusers' WanPipeline of `name` at full size, random weights (bf16; the VAE float32), on `device`;
    its scheduler's flow shift is the preset's (3.0 at 480p), so both sides sample alike."""
    import diffusers
    import transformers

    umt5 = transformers.UMT5Config(**UMT5_XXL)
    return diffusers.WanPipeline(
        tokenizer=make_t5_tokenizer(),
        text_encoder=seeded(3, torch.bfloat16, device, lambda: transformers.UMT5EncoderModel(umt5)),
        transformer=seeded(0, torch.bfloat16, device, lambda: diffusers.WanTransformer3DModel(
            **diffusers_kwargs(BENCH_MODELS[name].config))),
        vae=seeded(5, torch.float32, device, lambda: diffusers.AutoencoderKLWan()),
        scheduler=diffusers.UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG, flow_shift=3.0),
    )  # fmt: skip


def qwen_image_pipeline(name: str, device: torch.device):
    """diffusers' QwenImagePipeline at full size, random bf16 weights, on `device` (about 58 GB: it fits an
    80 GB GPU); the tests' tokenizer (its template's system turn is 34 tokens, as Qwen's)."""
    import diffusers
    import transformers

    from sgdiff.bench.qwen_parts import QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION
    from sgdiff.testing.tiny_qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG, make_qwen_tokenizer

    vl = transformers.Qwen2_5_VLConfig(text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION)
    transformer_kwargs = diffusers_kwargs(BENCH_MODELS[name].config)
    return diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=seeded(7, torch.bfloat16, device, lambda: diffusers.AutoencoderKLQwenImage()),
        text_encoder=seeded(6, torch.bfloat16, device, lambda: transformers.Qwen2_5_VLForConditionalGeneration(vl)),
        tokenizer=make_qwen_tokenizer(),
        transformer=seeded(0, torch.bfloat16, device, lambda: diffusers.QwenImageTransformer2DModel(
            **transformer_kwargs)),
    )  # fmt: skip


FULL_SIZE = {"flux.1-dev": flux_pipeline, "flux.1-schnell": flux_pipeline, "wan2.1-t2v-1.3b": wan_pipeline,
             "qwen-image": qwen_image_pipeline}  # fmt: skip


def ensure_checkpoint(name: str, folder: Path, tiny: bool) -> Path:
    """`folder` holding the checkpoint (written once: a folder with a model_index.json is reused)."""
    if (folder / "model_index.json").is_file():
        return folder
    if name not in CHECKPOINT_MODELS:
        raise UserError(f"the end-to-end benchmark writes {list(CHECKPOINT_MODELS)} checkpoints, not {name}",
                        field="model")  # fmt: skip
    if tiny and name.startswith("wan"):
        from sgdiff.testing.tiny_wan import build_tiny_wan

        return build_tiny_wan(folder, variant="t2v")
    if tiny and name == "qwen-image":
        from sgdiff.testing.tiny_qwen_image import build_tiny_qwen_image

        return build_tiny_qwen_image(folder)
    if tiny:
        from sgdiff.testing.tiny_flux import build_tiny_flux

        return build_tiny_flux(folder, variant="dev" if name == "flux.1-dev" else "schnell")
    if not torch.cuda.is_available():
        raise UserError("a full-size checkpoint is built on a CUDA GPU (~35 GB): run on one, or use `tiny`")
    pipeline = FULL_SIZE[name](name, torch.device("cuda"))
    pipeline.save_pretrained(folder, safe_serialization=True)
    del pipeline
    gc.collect()
    torch.cuda.empty_cache()  # the processes timed next need the GPU's memory (Qwen-Image's first one ran out)
    return folder
