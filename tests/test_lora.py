"""LoRA adapters (sgdiff/lora/): a FLUX.1 or Wan transformer with adapters read from the formats diffusers
reads gives diffusers' output (load_lora_weights + set_adapters) on the same weights and inputs (fp32),
fused or unfused, one adapter or two stacked, with fused projections, FP8 weights and torch.compile;
removing them restores every weight bit for bit; a bad adapter is refused in one line."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file, save_file

from sgdiff.config import LoraConfig, ParallelConfig, RuntimeConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError
from sgdiff.lora import apply_loras, parse_lora_spec, read_lora
from sgdiff.models.flux import FluxTransformer, FluxTransformerConfig
from sgdiff.models.flux.packing import image_position_ids, text_position_ids
from sgdiff.models.layers import Linear
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.models.wan import WanTransformer, WanTransformerConfig
from sgdiff.models.wan.transformer import IGNORED_KEYS, KEEP_FP32
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.pipeline.registry import family_named
from sgdiff.speed.compile import compile_blocks
from sgdiff.speed.fp8 import use_fp8_weights
from sgdiff.speed.fuse import fuse_gelu, fuse_projections
from sgdiff.testing.compare import relative_error
from sgdiff.testing.distributed import run_on_ranks
from sgdiff.testing.lora_files import diffusers_file, factors, linear_names, original_file
from sgdiff.testing.sharded_flux import sharded_unfused_lora_flux
from sgdiff.testing.tiny_configs import WAN_TRANSFORMER
from sgdiff.testing.tiny_flux import make_transformer

TOLERANCE = 1e-5  # relative error of fp32 transformer outputs against diffusers'
FP8_TOLERANCE = 2e-2  # with FP8 weights
MOVED = 0.2  # each adapter set moves the output by more than this (relative): 20000x the tolerance
MAX_PIXEL_DIFF = 2  # of 255

# --- adapter files, written as the trainers write them ---------------------------------------------


def flux_kohya_names(joint_single: bool) -> dict[str, float | None]:
    """Every FLUX.1 layer kohya names, alpha 2 (a factor 1/2); the final layer without one (diffusers
    ignores its alpha). The single blocks' linear1 (q, k, v and the MLP in one) only when asked: diffusers
    splits it at FLUX.1-dev's sizes, whatever the model's."""
    names: dict[str, float | None] = {}
    for i in range(2):
        for stream in ("img", "txt"):
            names |= dict.fromkeys([f"double_blocks.{i}.{stream}_{part}" for part in
                                    ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "mod.lin")], 2.0)  # fmt: skip
        names |= dict.fromkeys([f"single_blocks.{i}.linear2", f"single_blocks.{i}.modulation.lin"], 2.0)
        if joint_single:
            names[f"single_blocks.{i}.linear1"] = 2.0
    for embedder in ("time_in", "vector_in", "guidance_in"):
        names |= dict.fromkeys([f"{embedder}.in_layer", f"{embedder}.out_layer"], 2.0)
    names |= {"img_in": 2.0, "txt_in": 2.0, "final_layer.linear": None, "final_layer.adaLN_modulation.1": None}
    return names


def wan_original_names() -> dict[str, float | None]:
    names: dict[str, float | None] = {}
    for i in range(2):
        for attention in ("self_attn", "cross_attn"):
            names |= dict.fromkeys([f"blocks.{i}.{attention}.{p}" for p in "qkvo"], 8.0)
        names |= dict.fromkeys([f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.2"], 8.0)
    embedders = ["time_projection.1", "head.head", *(f"{e}_embedding.{n}" for e in ("text", "time") for n in (0, 2))]
    return names | dict.fromkeys(embedders, None)  # (diffusers reads no alpha of these)


# --- the models: ours and diffusers', on the same weights -----------------------------------------


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny FLUX.1-dev transformer's folder and three adapter files for it: diffusers names with
    alphas, kohya names, and kohya's joint layers with their diffusers-named twin."""
    folder = tmp_path_factory.mktemp("lora-flux")
    make_transformer("dev", seed=5).save_pretrained(folder / "transformer")
    model = load_ours("flux", folder / "transformer")
    files = {
        "diffusers": diffusers_file(folder / "a.safetensors", model, linear_names(model), 1, alpha=2.0),
        "kohya": original_file(folder / "kohya.safetensors", model, flux_kohya_names(False), 2, "lora_unet_", True),
    }
    return folder, files


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A tiny Wan transformer's folder and adapter files for it: original (diffusion_model.) names,
    musubi-tuner's kohya names, diffusers names."""
    folder = tmp_path_factory.mktemp("lora-wan")
    torch.manual_seed(0)
    reference = WanTransformer3DModel(**dict(WAN_TRANSFORMER, in_channels=4, out_channels=4))
    with torch.no_grad():  # every weight off its init
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(folder / "transformer")
    model = load_ours("wan", folder / "transformer")
    musubi = {f"blocks.{i}.{a}.{p}": 2.0 for i in range(2) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    musubi |= {f"blocks.{i}.ffn.{n}": 2.0 for i in range(2) for n in (0, 2)}
    files = {
        "original": original_file(folder / "a.safetensors", model, wan_original_names(), 3, "diffusion_model.", False),
        "musubi": original_file(folder / "b.safetensors", model, musubi, 4, "lora_unet_", True),
        "diffusers": diffusers_file(folder / "c.safetensors", model, linear_names(model, "blocks."), 5),
    }
    return folder, files


def load_ours(kind: str, folder):
    if kind == "flux":
        config = FluxTransformerConfig.from_dict(read_json(folder / "config.json"))
        return load_own_model(build_on_meta(FluxTransformer, config), folder, torch.float32, torch.device("cpu"))
    config = WanTransformerConfig.from_dict(read_json(folder / "config.json"))
    model = build_on_meta(WanTransformer, config)
    return load_own_model(model, folder, torch.float32, torch.device("cpu"), KEEP_FP32, IGNORED_KEYS)


def inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(11)
    if kind == "wan":
        return dict(hidden_states=torch.randn(1, 4, 3, 8, 10, generator=g), timestep=torch.tensor([700.0]),
                    encoder_hidden_states=torch.randn(1, 9, 32, generator=g))  # fmt: skip
    rows, cols, text_len = 6, 8, 7
    return dict(
        hidden_states=torch.randn(1, rows * cols, 16, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.6]),
        img_ids=image_position_ids(rows, cols),
        txt_ids=text_position_ids(text_len),
        guidance=torch.full((1,), 3.5),
    )


_expected: dict = {}


def diffusers_output(kind: str, folder, adapters: list[tuple]) -> torch.Tensor:
    """diffusers' transformer output with `adapters` ((file, scale), ...) loaded and set (cached)."""
    key = (kind, str(folder), tuple((str(path), scale) for path, scale in adapters))
    if key not in _expected:
        with quiet_libraries():
            if kind == "flux":
                model = FluxTransformer2DModel.from_pretrained(folder / "transformer").eval()
                parts = dict.fromkeys(
                    ["scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
                )
                pipe = FluxPipeline(transformer=model, **parts)
            else:
                model = WanTransformer3DModel.from_pretrained(folder / "transformer").eval()
                parts = dict.fromkeys(["tokenizer", "text_encoder", "vae", "scheduler"])
                pipe = WanPipeline(transformer=model, **parts)
            for index, (path, _) in enumerate(adapters):
                source = kohya_as_diffusers(path) if path.name.startswith("kohya") else str(path)
                pipe.load_lora_weights(source, adapter_name=f"adapter{index}")
            if adapters:
                pipe.set_adapters([f"adapter{i}" for i in range(len(adapters))], [scale for _, scale in adapters])
            with torch.no_grad():
                _expected[key] = model(**inputs(kind), return_dict=False)[0]
    return _expected[key]


def kohya_as_diffusers(path) -> dict[str, torch.Tensor]:
    """diffusers' own conversion of a kohya FLUX file, with the `transformer.` prefix that diffusers 0.42.1
    leaves off the embedders' and the final layer's names (so that its load_lora_weights drops them
    unread): the adapter as kohya's trainer, ComfyUI and sgdiff apply it."""
    converted = FluxPipeline.lora_state_dict(str(path))
    return {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}


def ours_output(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(kind))


def speed_up(model, kind: str, fused_projections: bool, fp8: bool = False):
    """The toggles that change what runs, in speed/apply.py's order: the fused GELU (its GEMM's epilogue;
    not with FP8 weights), FP8 weights, fused projections."""
    groups = family_named(kind).fusable(model)
    if fused_projections and not fp8:
        assert fuse_gelu(groups) > 0
    if fp8:
        use_fp8_weights(model)
    if fused_projections:
        assert fuse_projections(groups) > 0
    return model


ADAPTER_SETS = {  # (file, scale) per adapter
    "flux-one": ("flux", [("diffusers", 0.8)]),
    "flux-two": ("flux", [("diffusers", 0.6), ("kohya", -0.7)]),
    "wan-one": ("wan", [("original", 0.9)]),
    "wan-two": ("wan", [("diffusers", 0.5), ("musubi", 1.2)]),
}


@pytest.mark.parametrize("mode", ["fused", "unfused"])
@pytest.mark.parametrize("fused_projections", ["plain", "fused-projections", "projections-fused-after"])
@pytest.mark.parametrize("adapter_set", list(ADAPTER_SETS))
def test_output_matches_diffusers(adapter_set, fused_projections, mode, request):
    kind, chosen = ADAPTER_SETS[adapter_set]
    folder, files = request.getfixturevalue(kind)
    adapters = [(files[name], scale) for name, scale in chosen]
    expected = diffusers_output(kind, folder, adapters)
    base = diffusers_output(kind, folder, [])
    assert relative_error(expected, base) > MOVED  # the adapters change the output far beyond the tolerance
    model = speed_up(load_ours(kind, folder / "transformer"), kind, fused_projections == "fused-projections")
    assert relative_error(ours_output(model, kind), base) <= TOLERANCE
    names = set(model.state_dict())
    handle = apply_loras(model, [(read_lora(str(path)), scale) for path, scale in adapters], mode)
    if fused_projections == "projections-fused-after":  # the toggle after the adapters: both orders work
        speed_up(model, kind, fused_projections=True)
    assert relative_error(ours_output(model, kind), expected) <= TOLERANCE
    assert set(model.state_dict()) == names  # (the unfused factors are in no state dict)
    handle.remove()
    assert relative_error(ours_output(model, kind), base) <= TOLERANCE


def test_kohya_joint_layers_equal_their_diffusers_twin(flux, tmp_path):
    """kohya's joint layers (a double block's q/k/v; a single block's linear1: q, k, v and the MLP's input)
    update the rows of our Linears in that order: the output of a diffusers-named file that holds each
    Linear's rows (and a copy of the down factor). diffusers itself splits linear1 only at FLUX.1-dev's sizes."""
    folder, _ = flux
    model = load_ours("flux", folder / "transformer")
    joint = {"double_blocks.1.txt_attn.qkv": 8.0, "single_blocks.0.linear1": 8.0}
    kohya = original_file(tmp_path / "kohya.safetensors", model, joint, 7, "lora_unet_", True)
    parts = {
        "double_blocks_1_txt_attn_qkv": [f"transformer_blocks.1.attn.add_{p}_proj" for p in "qkv"],
        "single_blocks_0_linear1": [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k",
                                                                                 "attn.to_v", "proj_mlp")],
    }  # fmt: skip
    stored = load_file(kohya)
    twin: dict[str, torch.Tensor] = {}
    for name, targets in parts.items():
        rows = [model.get_submodule(target).out_features for target in targets]
        ups = stored[f"lora_unet_{name}.lora_up.weight"].split(rows)
        for target, up in zip(targets, ups, strict=True):
            twin[f"transformer.{target}.lora_A.weight"] = stored[f"lora_unet_{name}.lora_down.weight"].clone()
            twin |= {
                f"transformer.{target}.lora_B.weight": up.contiguous(),
                f"transformer.{target}.alpha": torch.tensor(8.0),
            }
    save_file(twin, tmp_path / "twin.safetensors")
    outputs = []
    for path in (kohya, tmp_path / "twin.safetensors"):
        handle = apply_loras(model, [(read_lora(str(path)), 0.9)], "unfused")
        outputs.append(ours_output(model, "flux"))
        handle.remove()
    assert relative_error(outputs[0], outputs[1]) <= 1e-6
    assert relative_error(outputs[0], ours_output(model, "flux")) > 1e-2  # (two layers: they move it less)


def weights_of(model) -> dict[str, torch.Tensor]:
    """Every tensor the model computes with, float8 ones as their bytes; the fused projections' too."""
    tensors = {name: t.clone() for name, t in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.fused is not None:
            tensors[f"{name}.fused.weight"] = module.fused.weight.clone()
            if module.fused.scale is not None:
                tensors[f"{name}.fused.scale"] = module.fused.scale.clone()
    return {name: t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t
            for name, t in tensors.items()}  # fmt: skip


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_fuse_then_remove_restores_every_weight_bit_for_bit(flux, fp8):
    folder, files = flux
    model = speed_up(load_ours("flux", folder / "transformer"), "flux", fused_projections=True, fp8=fp8)
    before = weights_of(model)
    adapters = [(read_lora(str(files["diffusers"])), 0.6), (read_lora(str(files["kohya"])), -0.7)]
    fused = apply_loras(model, adapters, "fused")
    during = weights_of(model)
    changed = [name for name in before if not torch.equal(before[name], during[name])]
    assert any(name.endswith("fused.weight") for name in changed)  # the groups' rows got the updates too
    assert any(name.endswith("fused.scale") for name in changed) == fp8
    for name, module in model.named_modules():  # each Linear still a view of its group's rows
        if isinstance(module, Linear) and module.fused is not None:
            assert module.weight.data_ptr() == module.fused.weight.data_ptr(), name
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        apply_loras(model, adapters, "unfused")
    fused.set_scales([0.3, 0.0])
    fused.remove()
    after = weights_of(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(module.lora is None for module in model.modules() if isinstance(module, Linear))
    one_run = apply_loras(model, adapters, "fused", keep_base=False)  # no copy of the base: no way back
    with pytest.raises(ValueError, match="without keeping the base weights"):
        one_run.remove()


@pytest.mark.parametrize(("dtype", "fp8"), [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)],
                         ids=["fp32", "fp8", "bf16-fp8"])  # fmt: skip
def test_fused_switches_from_the_base_copy_as_fresh_runs_fuse(flux, dtype, fp8):
    """As a server switches fused adapters: applied at scale 0 with a copy of the base weights, before the speed
    toggles (FP8 weights, fused projections, as ModelRunner.load orders them); each set_scales gives every
    weight (FP8: its bytes and scales) the value a fresh model gets with those adapters fused once before the
    toggles, and scales 0 give the base model's with the toggles, bit for bit (bf16: the sum rounded to bf16
    before FP8 quantises it, as there)."""
    folder, files = flux
    adapters = [(read_lora(str(files["diffusers"])), 0.0), (read_lora(str(files["kohya"])), 0.0)]

    def fresh(scales: list[float]) -> dict[str, torch.Tensor]:
        model = load_ours("flux", folder / "transformer").to(dtype)
        chosen = [(weights, scale) for (weights, _), scale in zip(adapters, scales, strict=True) if scale]
        if chosen:
            apply_loras(model, chosen, "fused", keep_base=False)
        return weights_of(speed_up(model, "flux", fused_projections=True, fp8=fp8))

    model = load_ours("flux", folder / "transformer").to(dtype)
    handle = apply_loras(model, adapters, "fused", base_room=2**40)  # (room: the copy on the weights' device)
    assert handle.applied.base_device == torch.device("cpu")
    speed_up(model, "flux", fused_projections=True, fp8=fp8)
    base = fresh([0.0, 0.0])
    assert weights_of(model).keys() == base.keys()
    for scales in ([0.6, 0.0], [0.6, -0.7], [0.0, -0.7], [0.0, 0.0]):
        handle.set_scales(scales)
        expected, now = fresh(scales), weights_of(model)
        assert [name for name in expected if not torch.equal(expected[name], now[name])] == [], scales
        moved = [name for name in base if not torch.equal(base[name], now[name])]
        assert bool(moved) == any(scales) and (not fp8 or not moved or any("scale" in name for name in moved))
    handle.remove()
    assert all(torch.equal(base[name], tensor) for name, tensor in weights_of(model).items())


def test_a_base_copy_without_room_is_refused_and_nothing_changes(flux):
    folder, files = flux
    model = load_ours("flux", folder / "transformer")
    before = weights_of(model)
    adapters = [(read_lora(str(files["diffusers"])), 0.6)]
    with pytest.raises(UserError, match=r"copy of the base weights they change \(0\.0 GiB\) and neither the GPU nor "
                                        r"CPU memory has room for it: use lora_mode unfused"):  # fmt: skip
        apply_loras(model, adapters, "fused", base_room=0, cpu_room=1000)
    assert all(torch.equal(before[name], tensor) for name, tensor in weights_of(model).items())
    apply_loras(model, adapters, "fused", cpu_room=2**40).remove()  # (the model was left free of adapters)


def test_fp8_weights_take_the_adapters_fused_or_unfused(flux):
    """With FP8 weights, fused adapters are quantised with the weights (new per-row scales): the output
    is the unfused one (the adapters in full precision beside float8 weights) up to FP8's rounding."""
    folder, files = flux
    adapters = [(read_lora(str(files["diffusers"])), 0.6), (read_lora(str(files["kohya"])), -0.7)]
    expected = diffusers_output("flux", folder, [(files["diffusers"], 0.6), (files["kohya"], -0.7)])
    outputs = {}
    for mode in ("fused", "unfused"):
        model = speed_up(load_ours("flux", folder / "transformer"), "flux", fused_projections=True, fp8=True)
        handle = apply_loras(model, adapters, mode)
        outputs[mode] = ours_output(model, "flux")
        handle.remove()
    assert relative_error(expected, diffusers_output("flux", folder, [])) > MOVED
    for mode in ("fused", "unfused"):  # (FP8 weights alone move this model's output by 0.4%)
        assert relative_error(outputs[mode], expected) <= FP8_TOLERANCE, mode


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_adapters_applied_before_fp8_weights_as_the_engine_does(flux, mode):
    """ModelRunner.load applies the adapters before the speed toggles: FP8 then quantises the fused weights once,
    or leaves the unfused factors in the compute dtype; diffusers' output up to FP8's rounding either way."""
    folder, files = flux
    expected = diffusers_output("flux", folder, [(files["diffusers"], 0.6), (files["kohya"], -0.7)])
    model = load_ours("flux", folder / "transformer")
    adapters = [(read_lora(str(files["diffusers"])), 0.6), (read_lora(str(files["kohya"])), -0.7)]
    apply_loras(model, adapters, mode, keep_base=False)
    speed_up(model, "flux", fused_projections=True, fp8=True)
    assert relative_error(ours_output(model, "flux"), expected) <= FP8_TOLERANCE


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_switching_adapters_does_not_compile_again(wan, mode):
    from torch._dynamo.utils import counters

    folder, files = wan
    model = speed_up(load_ours("wan", folder / "transformer"), "wan", fused_projections=True)
    names = ("diffusers", "musubi")
    handle = apply_loras(model, [(read_lora(str(files[name])), 0.0) for name in names], mode)
    before = counters["stats"]["unique_graphs"]
    compile_blocks(model, backend="eager")
    ours_output(model, "wan")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before  # (torch.compile traced the blocks)
    for scales in ([0.5, 1.2], [0.0, 1.2], [0.5, 0.0]):
        handle.set_scales(scales)
        expected = diffusers_output("wan", folder, [(files[n], s) for n, s in zip(names, scales, strict=True) if s])
        assert relative_error(ours_output(model, "wan"), expected) <= TOLERANCE
    assert counters["stats"]["unique_graphs"] == graphs
    handle.remove()


def test_flux_image_with_adapters_matches_diffusers(tiny_flux_dev, tmp_path):
    """A whole image through ModelRunner: two adapters fused into the loaded transformer give diffusers'
    image (decoded, 2/255), which the adapters moved far more than that."""
    model = load_ours("flux", tiny_flux_dev / "transformer")
    paths = [
        diffusers_file(tmp_path / "a.safetensors", model, linear_names(model, "attn"), 8, alpha=8.0),
        original_file(tmp_path / "kohya.safetensors", model, flux_kohya_names(False), 9, "lora_unet_", True),
    ]
    request = dict(height=32, width=48, num_inference_steps=3, guidance_scale=4.0)
    runner = ModelRunner(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    runner.load()
    assert runner.pipeline is not None
    apply_loras(runner.pipeline.transformers[0], [(read_lora(str(paths[0])), 0.7), (read_lora(str(paths[1])), 0.5)])
    images = runner.generate(runner.sampling_params("a red cube", seed=7, **request)).images
    assert images is not None
    with quiet_libraries():
        pipe = FluxPipeline.from_pretrained(tiny_flux_dev, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe("a red cube", generator=torch.Generator().manual_seed(7), output_type="np", **request)  # noqa: E731
        base = run().images
        pipe.load_lora_weights(str(paths[0]), adapter_name="a")
        pipe.load_lora_weights(kohya_as_diffusers(paths[1]), adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, 0.5])
        expected = (run().images * 255).round().astype(np.int64)
    assert np.abs(images.astype(np.int64) - expected).max() <= MAX_PIXEL_DIFF
    assert np.abs((base * 255).round() - expected).max() > 20 * MAX_PIXEL_DIFF


# --- refusals, one line each ------------------------------------------------------------------------


def refusal(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_an_adapter_of_another_model_fits_no_layer(flux, wan):
    flux_folder, _ = flux
    _, wan_files = wan
    model = load_ours("flux", flux_folder / "transformer")
    message = refusal(lambda: apply_loras(model, [(read_lora(str(wan_files["original"])), 1.0)]))
    assert message.startswith(f"the LoRA file {wan_files['original']} fits no layer of this FluxTransformer: ")
    assert re.search(r": blocks\.0\.attn[12]\.to_\w+ is not a layer of it; ", message) and "(and 23 more)" in message


def test_wrong_shapes_are_named_and_nothing_is_applied(flux, tmp_path):
    folder, files = flux
    model = load_ours("flux", folder / "transformer")
    before = weights_of(model)
    g = torch.Generator().manual_seed(0)
    (narrow_down, narrow_up), (down, up) = factors(64, 48, g), factors(64, 64, g)
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": narrow_down,
               "transformer_blocks.0.attn.to_q.lora_B.weight": narrow_up,
               "transformer_blocks.0.attn.to_k.lora_A.weight": down,
               "transformer_blocks.0.attn.to_k.lora_B.weight": up}, tmp_path / "wide.safetensors")  # fmt: skip
    good = read_lora(str(files["diffusers"]))
    message = refusal(lambda: apply_loras(model, [(good, 1.0), (read_lora(str(tmp_path / "wide.safetensors")), 1.0)]))
    assert message == (
        f"the LoRA file {tmp_path / 'wide.safetensors'} does not fit this FluxTransformer (1 of its 2 layers do "
        "not): transformer_blocks.0.attn.to_q expects [64, 64], the adapter has [64, 48]"
    )
    assert all(torch.equal(before[name], t) for name, t in weights_of(model).items())  # the good one not applied
    assert all(module.lora is None for module in model.modules() if isinstance(module, Linear))


def test_a_safetensors_file_whose_header_length_starts_like_a_pickle_is_read(tmp_path):
    """A safetensors file starts with its header's length (8 bytes, little-endian): 128 + 256k starts with
    0x80, the byte a bare pickle starts with; the header's "{" after it tells them apart."""
    tensors = {"transformer.x.lora_A.weight": torch.ones(2, 3), "transformer.x.lora_B.weight": torch.ones(3, 2)}
    path = tmp_path / "adapter.safetensors"
    for padding in range(264):  # (headers are padded to 8 bytes: 32 lengths mod 256)
        save_file(tensors, path, metadata={"note": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert [layer.targets for layer in read_lora(str(path)).layers] == [("x",)]


def test_pickles_missing_files_and_text_encoder_layers_are_refused(tmp_path, monkeypatch):
    tensors = {"transformer.x.lora_A.weight": torch.zeros(2, 3), "transformer.x.lora_B.weight": torch.zeros(3, 2)}
    (tmp_path / "pickles").mkdir()
    torch.save(tensors, tmp_path / "pickles" / "adapter.bin")
    torch.save(tensors, tmp_path / "pickled.safetensors")
    for name in ("pickled.safetensors", "pickles/adapter.bin"):
        assert "is a pickle file; sgdiff loads LoRA adapters from .safetensors only" in refusal(
            lambda name=name: read_lora(str(tmp_path / name))
        )
    assert "holds only pickle weights" in refusal(lambda: read_lora(str(tmp_path / "pickles")))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert "is not a readable safetensors file" in refusal(lambda: read_lora(str(tmp_path / "junk.safetensors")))
    missing = tmp_path / "nowhere" / "missing.safetensors"
    assert refusal(lambda: read_lora(str(missing))) == (
        f"lora_path {missing} does not exist (and is not a Hub repo id like owner/name)"
    )
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "is not in the local HF cache" in refusal(lambda: read_lora("nobody/no-such-lora"))
    save_file({**tensors, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 3)},
              tmp_path / "te.safetensors")  # fmt: skip
    assert "also adapts the text encoder (1 of its tensors, e.g. lora_te1_text_model" in refusal(
        lambda: read_lora(str(tmp_path / "te.safetensors"))
    )
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 3)}, tmp_path / "half.safetensors")
    assert "has no up (lora_B) factor for transformer.x" in refusal(
        lambda: read_lora(str(tmp_path / "half.safetensors"))
    )


def test_specs_and_modes():
    assert parse_lora_spec("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert parse_lora_spec("owner/name") == ("owner/name", 1.0)
    assert parse_lora_spec("owner/name:-1") == ("owner/name", -1.0)
    assert parse_lora_spec("a:b.safetensors") == ("a:b.safetensors", 1.0)
    adapters = (("style.safetensors", 1.0),)
    resolved = {
        (mode, switching, moved): LoraConfig(adapters, mode).resolved(switching, in_place=not moved)
        for mode in ("auto", "fused", "unfused")
        for switching in (False, True)
        for moved in (False, True)
    }
    # auto: fused, unless a server's transformer weights move or are copied (offload, sequence parallelism); a
    # server's fused adapters switch where they stay in place
    assert {key: (config.mode, config.switching) for key, config in resolved.items()} == {
        ("auto", False, False): ("fused", False), ("auto", False, True): ("fused", False),
        ("auto", True, False): ("fused", True), ("auto", True, True): ("unfused", True),
        ("fused", False, False): ("fused", False), ("fused", False, True): ("fused", False),
        ("fused", True, False): ("fused", True), ("fused", True, True): ("fused", False),
        ("unfused", False, False): ("unfused", False), ("unfused", False, True): ("unfused", False),
        ("unfused", True, False): ("unfused", True), ("unfused", True, True): ("unfused", True),
    }  # fmt: skip
    assert LoraConfig().resolved(True, in_place=True) == LoraConfig()  # (no adapters: nothing to switch)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "fp8"),
    [(ParallelConfig(2), False), (ParallelConfig(2, ring_degree=2), False), (ParallelConfig(2), True)],
    ids=["ulysses-2-inputs-travel", "ring-2", "ulysses-2-fp8-weights"],
)
def test_unfused_adapters_switch_under_sequence_parallelism(config, fp8):
    """Unfused adapters stay beside the Linears that sequence parallelism cuts: each rank adds their updates of its
    share of the modulation (with FP8 weights, to its FP8 rows), and (Ulysses-2, bf16 weights) of its heads' q/k/v
    rows of every rank's tokens; scales switched after the model was sharded reach both."""
    travels = config.ring_degree is None and not fp8  # (FP8 projections run in the model: q, k and v travel)
    # FP8: a rounding difference of 1e-7 in a modulation row (its sum over fewer rows) can move an activation
    # across an FP8 step, 1/16 of its size: 5e-4 of the output here (the modulation updates left out: 0.25-0.4 of it)
    tolerance = 5e-3 if fp8 else 1e-5
    for rank, result in enumerate(run_on_ranks(config, sharded_unfused_lora_flux, 1, fp8)):
        assert result["lora_pieces"] > 0, f"rank {rank} computed no modulation rows with adapters"
        assert max(result["sharded"]) <= tolerance * result["scale"], f"rank {rank}: {result}"
        assert min(result["moved"][:-1]) > 0.05 * result["scale"], f"rank {rank}: the adapters barely move it"
        assert result["inputs_travelled"] == travels, f"rank {rank}: {result}"
