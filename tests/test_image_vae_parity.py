"""sgdiff's image VAE decoder against diffusers' AutoencoderKL.decode on the same weights (fp32, CPU),
its loading from a diffusers checkpoint folder, and the configs it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sgdiff.bench.parts import FLUX_VAE as FLUX_1_VAE
from sgdiff.cli.main import app
from sgdiff.demo.architecture import IMAGE_VAE_CONFIG
from sgdiff.errors import UserError
from sgdiff.families.flux.pipeline import VAE_UNUSED
from sgdiff.models.image_vae import ImageVaeConfig, ImageVaeDecoder
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.testing.compare import max_relative_error, randomize_weights
from sgdiff.testing.tiny_configs import FLUX_VAE

TOLERANCE = 1e-5  # max |ours - reference| / max |reference|
DEMO_VAE = Path(__file__).resolve().parents[1] / "sgdiff" / "demo" / "models" / "image" / "vae"
WIDE_VAE = {  # post_quant_conv on, no mid-block attention, 3 resnets per up block, widths that change twice
    **FLUX_VAE,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (8, 16, 24),
    "layers_per_block": 2,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": False,
}


def reference_vae(config: dict, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return randomize_weights(AutoencoderKL(**config), seed)


def ours_like(reference: AutoencoderKL) -> ImageVaeDecoder:
    """Our decoder with the reference's decoding weights, built on meta and given them with assign=True."""
    ours = build_on_meta(ImageVaeDecoder, ImageVaeConfig.from_dict(dict(reference.config)))
    state = {k: v for k, v in reference.state_dict().items() if not set(k.split(".")) & set(VAE_UNUSED)}
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.eval()


def decode_both(ours: ImageVaeDecoder, reference: AutoencoderKL, latents: torch.Tensor):
    with torch.no_grad():
        return ours.decode(latents), reference.decode(latents, return_dict=False)[0]


def assert_parity(ours: ImageVaeDecoder, reference: AutoencoderKL, shape: tuple[int, ...], seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    first, second = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    actual, expected = decode_both(ours, reference, first)
    factor = ours.config.scale_factor
    assert actual.shape == expected.shape == (shape[0], ours.config.out_channels, shape[2] * factor, shape[3] * factor)
    assert torch.isfinite(actual).all()
    error = max_relative_error(actual, expected)
    assert error <= TOLERANCE
    # the output depends on the latents (and so on every weight along the way) far beyond the tolerance
    other, _ = decode_both(ours, reference, second)
    assert max_relative_error(other, expected) > 1000 * TOLERANCE
    return error


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (FLUX_VAE, (2, FLUX_VAE["latent_channels"], 6, 10)),  # tiny FLUX VAE, batch 2, h != w
        (WIDE_VAE, (2, WIDE_VAE["latent_channels"], 5, 3)),
        (IMAGE_VAE_CONFIG, (2, IMAGE_VAE_CONFIG["latent_channels"], 12, 8)),  # the demo's, random weights
        (FLUX_1_VAE, (1, FLUX_1_VAE["latent_channels"], 4, 6)),  # FLUX.1's full-size architecture, small latents
    ],
    ids=["tiny-flux", "post-quant-conv", "demo-config", "flux.1-config"],
)
def test_decoder_matches_diffusers_on_random_weights(config, shape):
    reference = reference_vae(config, seed=sum(shape))
    assert_parity(ours_like(reference), reference, shape, seed=len(config))


def test_decoder_matches_diffusers_on_the_demo_weights():
    reference = AutoencoderKL.from_pretrained(DEMO_VAE, dtype=torch.float32).eval()
    config = ImageVaeConfig.from_dict(read_json(DEMO_VAE / "config.json"))
    ours = load_own_model(build_on_meta(ImageVaeDecoder, config), DEMO_VAE, torch.float32, torch.device("cpu"),
                          ignored=VAE_UNUSED)  # fmt: skip
    assert_parity(ours, reference, (2, config.latent_channels, 32, 24), seed=0)


def test_every_decoding_tensor_is_loaded_and_no_encoding_one(tmp_path):
    reference = reference_vae(WIDE_VAE, seed=5)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    config = ImageVaeConfig.from_dict(read_json(tmp_path / "config.json"))
    ours = load_own_model(build_on_meta(ImageVaeDecoder, config), tmp_path, torch.float32, torch.device("cpu"),
                          ignored=VAE_UNUSED)  # fmt: skip
    theirs = reference.state_dict()
    wanted = {k for k in theirs if not k.startswith(("encoder.", "quant_conv."))}
    assert set(ours.state_dict()) == wanted and "post_quant_conv.weight" in wanted
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def test_a_missing_decoder_tensor_is_refused(tmp_path):
    reference_vae(FLUX_VAE, seed=1).save_pretrained(tmp_path, safe_serialization=True)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["decoder.mid_block.attentions.0.to_k.bias"]
    save_file(state, weights)
    model = build_on_meta(ImageVaeDecoder, ImageVaeConfig.from_dict(read_json(tmp_path / "config.json")))
    with pytest.raises(UserError, match=r"missing \['decoder.mid_block.attentions.0.to_k.bias'\]"):
        load_own_model(model, tmp_path, torch.float32, torch.device("cpu"), ignored=VAE_UNUSED)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"act_fn": "gelu"}, "act_fn 'gelu'"),
        (
            {"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]},
            "up_block_types holds 'AttnUpDecoderBlock2D'",
        ),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types has 1 entries, block_out_channels 2"),
        ({"norm_num_groups": 3}, "block_out_channels 8 is not a multiple of norm_num_groups 3"),
    ],
)
def test_unsupported_config_is_refused_in_one_line(change, named):
    with pytest.raises(UserError) as refused:
        ImageVaeConfig.from_dict({**FLUX_VAE, **change}, source="vae/config.json")
    message = str(refused.value)
    assert message.startswith("vae/config.json: ") and named in message and "\n" not in message


def test_cli_refuses_an_unsupported_vae_in_one_line(tiny_flux_dev, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_flux_dev, model)
    config_path = model / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "act_fn": "gelu"}))
    result = CliRunner().invoke(app, ["generate", "--model-path", str(model), "--prompt", "p", "--no-save-output"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {config_path}: act_fn 'gelu' is not supported (sgdiff's image VAE decodes 'silu' only)"]
