"""LoRA adapters on Qwen-Image (its Edit models share the transformer), HunyuanVideo and HunyuanVideo-1.5: the
transformer's output with adapters in every format diffusers reads for the family is diffusers' (the pipeline's
load_lora_weights + set_adapters; HunyuanVideo-1.5, whose pipelines have no LoRA loader: its transformer's
load_lora_adapter), fp32, fused or unfused, with and without fused projections; removing them restores it.

Where diffusers' conversion fails on a tiny model or is wrong, the file is compared with its twin in diffusers'
names (the conversion done by hand), which diffusers reads: HunyuanVideo's single-stream `linear1` (diffusers
splits it at 3072 rows whatever the model), its text refiner's `self_attn_qkv` (diffusers cuts the down factor
into three as well), its final modulation (diffusers swaps the down factor's halves with the up factor's: right
only where they are alike), and kohya's (musubi-tuner's) names (diffusers' HunyuanVideo conversion reads no
lora_down / lora_up)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import HunyuanVideoPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
from safetensors.torch import load_file, save_file

from sgdiff.lora import apply_loras, read_lora
from sgdiff.lora.original_names import RULES, original_readings
from sgdiff.models.hunyuan_video import HunyuanVideoTransformer, HunyuanVideoTransformerConfig
from sgdiff.models.hunyuan_video15 import HunyuanVideo15Transformer, HunyuanVideo15TransformerConfig
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.models.qwen_image import QwenImageTransformer, QwenImageTransformerConfig
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.pipeline.registry import family_named
from sgdiff.speed.fuse import fuse_gelu, fuse_projections
from sgdiff.testing import tiny_hunyuan_video, tiny_hunyuan_video15, tiny_qwen_image
from sgdiff.testing.compare import relative_error
from sgdiff.testing.lora_files import RANK, diffusers_file, linear_names, original_file, peft_metadata

TOLERANCE = 1e-5  # relative error of fp32 transformer outputs against diffusers'
MOVED = 0.2  # each adapter set moves the output by more than this (relative): 20000x the tolerance
FINAL_MODULATION = "final_layer.adaLN_modulation.1"

# --- the families: diffusers' transformer and pipeline, ours, the inputs --------------------------------------

OURS = {
    "qwen_image": (QwenImageTransformer, QwenImageTransformerConfig),
    "hunyuan_video": (HunyuanVideoTransformer, HunyuanVideoTransformerConfig),
    "hunyuan_video15": (HunyuanVideo15Transformer, HunyuanVideo15TransformerConfig),
}
REFERENCES = {
    "qwen_image": lambda: tiny_qwen_image.make_transformer(seed=3),
    "hunyuan_video": lambda: tiny_hunyuan_video.make_transformer(seed=3),
    "hunyuan_video15": lambda: tiny_hunyuan_video15.make_transformer(seed=3, task_type="t2v"),
}
PIPELINES = {  # (diffusers' pipeline whose load_lora_weights reads the files, its other parts; None: no loader)
    "qwen_image": (QwenImagePipeline, ["scheduler", "vae", "text_encoder", "tokenizer"]),
    "qwen_image-edit-plus": (QwenImageEditPlusPipeline, ["scheduler", "vae", "text_encoder", "tokenizer", "processor"]),
    "hunyuan_video": (HunyuanVideoPipeline, ["text_encoder", "tokenizer", "vae", "scheduler", "text_encoder_2",
                                             "tokenizer_2"]),
    "hunyuan_video15": None,
}  # fmt: skip


def inputs(kind: str) -> dict:
    """One batch row, as the pipelines pass it; `qwen_image-edit-plus`: the noise grid and two input images'."""
    g = torch.Generator().manual_seed(11)
    if kind.startswith("qwen_image"):
        config = tiny_qwen_image.TRANSFORMER
        grids = [(1, 4, 6)] if kind == "qwen_image" else [(1, 4, 4), (1, 3, 5), (1, 2, 4)]
        tokens = sum(math.prod(grid) for grid in grids)
        return dict(hidden_states=torch.randn(1, tokens, config["in_channels"], generator=g),
                    encoder_hidden_states=torch.randn(1, 7, config["joint_attention_dim"], generator=g),
                    timestep=torch.tensor([0.83]), img_shapes=[grids])  # fmt: skip
    if kind == "hunyuan_video":
        config = tiny_hunyuan_video.TRANSFORMER
        return dict(hidden_states=torch.randn(1, config["in_channels"], 3, 4, 6, generator=g),
                    timestep=torch.tensor([700.0]),
                    encoder_hidden_states=torch.randn(1, 7, config["text_embed_dim"], generator=g),
                    pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g),
                    guidance=torch.tensor([6000.0]))  # fmt: skip
    config = tiny_hunyuan_video15.TRANSFORMER  # text to video: no condition latents, all-zero image features
    noise = torch.randn(1, tiny_hunyuan_video15.LATENT_CHANNELS, 3, 4, 6, generator=g)
    return dict(hidden_states=torch.cat([noise, torch.zeros_like(noise), torch.zeros_like(noise[:, :1])], dim=1),
                timestep=torch.tensor([830.0]),
                encoder_hidden_states=torch.randn(1, 9, config["text_embed_dim"], generator=g),
                encoder_attention_mask=(torch.arange(9) < 7).float()[None],
                encoder_hidden_states_2=torch.randn(1, 4, config["text_embed_2_dim"], generator=g),
                encoder_attention_mask_2=torch.ones(1, 4),
                image_embeds=torch.zeros(1, 5, config["image_embed_dim"]))  # fmt: skip


def family_of(kind: str) -> str:
    return kind.removesuffix("-edit-plus")


def load_ours(kind: str, folder):
    cls, config = OURS[family_of(kind)]
    model = build_on_meta(cls, config.from_dict(read_json(folder / "transformer" / "config.json")))
    return load_own_model(model, folder / "transformer", torch.float32, torch.device("cpu"))


def ours_output(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(kind))


_expected: dict = {}


def diffusers_output(kind: str, folder, adapters: list[tuple]) -> torch.Tensor:
    """diffusers' transformer output with `adapters` ((file, scale), ...) loaded and set (cached)."""
    key = (kind, str(folder), tuple((str(path), scale) for path, scale in adapters))
    if key not in _expected:
        with quiet_libraries():
            model = type(REFERENCES[family_of(kind)]()).from_pretrained(folder / "transformer").eval()
            names = [f"adapter{index}" for index in range(len(adapters))]
            if PIPELINES[kind] is None:
                for name, (path, _) in zip(names, adapters, strict=True):  # (use_safetensors: else no metadata)
                    model.load_lora_adapter(str(path), adapter_name=name, prefix="transformer", use_safetensors=True)
                loader = model
            else:
                pipeline, parts = PIPELINES[kind]
                loader = pipeline(transformer=model, **dict.fromkeys(parts))
                for name, (path, _) in zip(names, adapters, strict=True):
                    loader.load_lora_weights(str(path), adapter_name=name)
            if adapters:
                loader.set_adapters(names, [scale for _, scale in adapters])
            x = inputs(kind)
            if kind == "hunyuan_video":  # (its forward needs a mask: all ones, as ours assumes)
                x["encoder_attention_mask"] = torch.ones(x["encoder_hidden_states"].shape[:2], dtype=torch.long)
            with torch.no_grad():
                _expected[key] = model(**x, return_dict=False)[0]
    return _expected[key]


# --- adapter files, written as the trainers write them ------------------------------------------------------


def hunyuan_original_names(alpha: float | None) -> dict[str, float | None]:
    """Every HunyuanVideo module diffusers' conversion reads at the tiny size (not `single_blocks.N.linear1`
    nor the refiner's `self_attn_qkv`: test_joint_and_swapped_layers_are_their_diffusers_twin)."""
    parts = ["img_attn_qkv", "img_attn_proj", "img_mlp.fc1", "img_mlp.fc2", "img_mod.linear"]
    parts += [part.replace("img", "txt") for part in parts]
    names = [f"double_blocks.{i}.{part}" for i in range(2) for part in parts]
    names += [f"single_blocks.{i}.{part}" for i in range(2) for part in ("linear2", "modulation.linear")]
    names += [f"{e}.mlp.{n}" for e in ("time_in", "guidance_in") for n in (0, 2)]
    names += ["vector_in.in_layer", "vector_in.out_layer", "final_layer.linear", FINAL_MODULATION]
    names += ["txt_in.input_embedder", "txt_in.t_embedder.mlp.0", "txt_in.t_embedder.mlp.2"]
    names += ["txt_in.c_embedder.linear_1", "txt_in.c_embedder.linear_2"]
    refiner = "txt_in.individual_token_refiner.blocks"
    names += [f"{refiner}.{i}.{part}" for i in range(2) for part in ("self_attn_proj", "mlp.fc1", "mlp.fc2",
                                                                     "adaLN_modulation.1")]  # fmt: skip
    return dict.fromkeys(names, alpha)


def peft_default_file(path, source):
    """`source` (diffusers names) as a PEFT model's state dict names it: no prefix, the adapter's name in the key."""
    tensors = load_file(source)
    save_file({k.removeprefix("transformer.").replace(".weight", ".default.weight"): v for k, v in tensors.items()},
              path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def qwen_image(tmp_path_factory):
    """The tiny Qwen-Image transformer's folder and its adapter files: diffusers names (alpha in the metadata),
    the trainers' `diffusion_model.` and kohya's `lora_unet_` spellings of them (with `.alpha`), and PEFT's."""
    folder = tmp_path_factory.mktemp("lora-qwen")
    REFERENCES["qwen_image"]().save_pretrained(folder / "transformer")
    model = load_ours("qwen_image", folder)
    every = linear_names(model)  # (img_in and txt_in too: FLUX.1's original names, Qwen-Image's own)
    files = {
        "diffusers": diffusers_file(folder / "a.safetensors", model, every, 1, metadata_alpha=8.0),
        "original": original_file(folder / "b.safetensors", model, dict.fromkeys(every, 2.0), 2, "diffusion_model.",
                                  False),
        "kohya": original_file(folder / "c.safetensors", model, dict.fromkeys(every, 8.0), 3, "lora_unet_", True),
    }  # fmt: skip
    files["peft"] = peft_default_file(folder / "d.safetensors", diffusers_file(folder / "e.safetensors", model,
                                                                               every, 4))  # fmt: skip
    return folder, files


@pytest.fixture(scope="module")
def hunyuan_video(tmp_path_factory):
    """The tiny HunyuanVideo transformer's folder and its adapter files: diffusers names (alpha in the metadata),
    the original names (`diffusion_model.`, as diffusion-pipe writes them; and `transformer.`), musubi-tuner's
    kohya names of the same factors (`.alpha` = the rank: diffusers reads them as the original file)."""
    folder = tmp_path_factory.mktemp("lora-hunyuan")
    REFERENCES["hunyuan_video"]().save_pretrained(folder / "transformer")
    model = load_ours("hunyuan_video", folder)
    swapped = [FINAL_MODULATION]
    files = {
        "diffusers": diffusers_file(folder / "a.safetensors", model, linear_names(model), 1, metadata_alpha=2.0),
        "original": original_file(folder / "b.safetensors", model, hunyuan_original_names(None), 2,
                                  "diffusion_model.", False, swapped),
        "musubi": original_file(folder / "c.safetensors", model, hunyuan_original_names(float(RANK)), 2, "lora_unet_",
                                True, swapped),
        "prefixed": original_file(folder / "d.safetensors", model, hunyuan_original_names(None), 3, "transformer.",
                                  False, swapped),
    }  # fmt: skip
    return folder, files


@pytest.fixture(scope="module")
def hunyuan_video15(tmp_path_factory):
    """The tiny HunyuanVideo-1.5 transformer's folder and two adapters in diffusers names."""
    folder = tmp_path_factory.mktemp("lora-hunyuan15")
    REFERENCES["hunyuan_video15"]().save_pretrained(folder / "transformer")
    model = load_ours("hunyuan_video15", folder)
    files = {
        "diffusers": diffusers_file(folder / "a.safetensors", model, linear_names(model), 1, metadata_alpha=8.0),
        "attention": diffusers_file(folder / "b.safetensors", model, linear_names(model, "attn"), 2),
    }
    return folder, files


DIFFUSERS_TWINS = {"musubi": "original"}  # files diffusers cannot read -> the file of the same factors it reads
ADAPTER_SETS = {  # (the inputs' kind, (file, scale) per adapter)
    "qwen-diffusers": ("qwen_image", [("diffusers", 0.8)]),
    "qwen-original-kohya": ("qwen_image", [("original", 0.9), ("kohya", -0.6)]),
    "qwen-edit-plus-peft": ("qwen_image-edit-plus", [("peft", 1.1)]),
    "hunyuan-diffusers": ("hunyuan_video", [("diffusers", 1.5)]),
    "hunyuan-original": ("hunyuan_video", [("original", 0.9)]),
    "hunyuan-musubi-prefixed": ("hunyuan_video", [("musubi", 0.7), ("prefixed", -0.5)]),
    "hunyuan15-two": ("hunyuan_video15", [("diffusers", 0.6), ("attention", -0.9)]),
}


def speed_up(model, kind: str):
    """The fused GELU and fused projections (speed/apply.py's order): Linears that run as one GEMM."""
    groups = family_named(family_of(kind)).fusable(model)
    assert fuse_gelu(groups) > 0 and fuse_projections(groups) > 0
    return model


@pytest.mark.parametrize("mode", ["fused", "unfused"])
@pytest.mark.parametrize("projections", ["plain", "fused-projections"])
@pytest.mark.parametrize("adapter_set", list(ADAPTER_SETS))
def test_output_matches_diffusers(adapter_set, projections, mode, request):
    kind, chosen = ADAPTER_SETS[adapter_set]
    folder, files = request.getfixturevalue(family_of(kind))
    expected = diffusers_output(kind, folder, [(files[DIFFUSERS_TWINS.get(n, n)], scale) for n, scale in chosen])
    base = diffusers_output(kind, folder, [])
    assert relative_error(expected, base) > MOVED  # the adapters change the output far beyond the tolerance
    model = load_ours(kind, folder)
    if projections == "fused-projections":
        speed_up(model, kind)
    assert relative_error(ours_output(model, kind), base) <= TOLERANCE
    handle = apply_loras(model, [(read_lora(str(files[name])), scale) for name, scale in chosen], mode)
    assert relative_error(ours_output(model, kind), expected) <= TOLERANCE
    handle.remove()
    assert relative_error(ours_output(model, kind), base) <= TOLERANCE


@pytest.mark.parametrize("spelling", ["original", "kohya"])
def test_joint_and_swapped_layers_are_their_diffusers_twin(hunyuan_video, tmp_path, spelling):
    """A single-stream block's linear1 updates q, k, v and the MLP's input by rows, the refiner's self_attn_qkv
    q, k and v, one down factor for all; the final modulation's rows are (shift, scale), ours (scale, shift):
    diffusers' output with a diffusers-named file that says so (the original's `.alpha` 8, a factor of 2, in its
    metadata)."""
    folder, _ = hunyuan_video
    model = load_ours("hunyuan_video", folder)
    refiner = "context_embedder.token_refiner.refiner_blocks.0"
    parts = {
        "single_blocks.1.linear1": [f"single_transformer_blocks.1.{p}" for p in ("attn.to_q", "attn.to_k",
                                                                                 "attn.to_v", "proj_mlp")],
        "txt_in.individual_token_refiner.blocks.0.self_attn_qkv": [f"{refiner}.attn.to_{p}" for p in "qkv"],
        FINAL_MODULATION: ["norm_out.linear"],
    }  # fmt: skip
    names = dict.fromkeys(parts, 8.0)
    path = original_file(tmp_path / "original.safetensors", model, names, 7, "diffusion_model.", False)
    stored = load_file(path)  # (the kohya file: the same factors)
    if spelling == "kohya":
        path = original_file(tmp_path / "kohya.safetensors", model, names, 7, "lora_unet_", True)
    twin: dict[str, torch.Tensor] = {}
    for name, targets in parts.items():
        down, up = stored[f"diffusion_model.{name}.lora_A.weight"], stored[f"diffusion_model.{name}.lora_B.weight"]
        if name == FINAL_MODULATION:
            up = torch.cat(up.chunk(2)[::-1])  # (shift, scale) -> (scale, shift): the up factor's rows only
        rows = [model.get_submodule(target).out_features for target in targets]
        for target, target_up in zip(targets, up.split(rows), strict=True):
            twin[f"transformer.{target}.lora_A.weight"] = down.clone()
            twin[f"transformer.{target}.lora_B.weight"] = target_up.contiguous()
    modules = [target for targets in parts.values() for target in targets]
    save_file(twin, tmp_path / "twin.safetensors", metadata=peft_metadata(8.0, modules))
    expected = diffusers_output("hunyuan_video", folder, [(tmp_path / "twin.safetensors", 1.5)])
    assert relative_error(expected, diffusers_output("hunyuan_video", folder, [])) > MOVED
    for mode in ("fused", "unfused"):
        handle = apply_loras(model, [(read_lora(str(path)), 1.5)], mode)
        assert relative_error(ours_output(model, "hunyuan_video"), expected) <= TOLERANCE, mode
        handle.remove()


def test_no_original_name_means_different_layers_in_two_families():
    """The families' rules are read together: a name two of them know (FLUX.1's and HunyuanVideo's
    `single_blocks.0.linear1`; kohya's `double_blocks_0_img_attn_qkv`, FLUX.1's `img_attn.qkv` and HunyuanVideo's
    `img_attn_qkv`) stands for the same layers in both."""
    for family, rules in RULES.items():
        for pattern, _ in rules:
            name = pattern.replace(r"(\d+)", "0").replace("\\", "")
            assert len(original_readings(name, underscored=False)) == 1, (family, name)
            assert len(original_readings(name.replace(".", "_"), underscored=True)) == 1, (family, name)
    shared = original_readings("double_blocks_3_img_attn_qkv", underscored=True)
    assert [reading.targets for reading in shared] == [tuple(f"transformer_blocks.3.attn.to_{p}" for p in "qkv")]


def test_a_name_of_two_families_is_read_by_the_model_it_meets(qwen_image):
    """`diffusion_model.img_in` is FLUX.1's x_embedder and Qwen-Image's img_in: the reading whose layers the
    model has is taken."""
    _, files = qwen_image
    [layer] = [layer for layer in read_lora(str(files["original"])).layers if layer.key == "diffusion_model.img_in"]
    assert [reading.targets for reading in layer.readings] == [("x_embedder",), ("img_in",)]
