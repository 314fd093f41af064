"""sgdiff's Wan video VAE decoder against diffusers' AutoencoderKLWan.decode on the same weights (fp32,
CPU; Wan 2.1 and Wan 2.2 layouts), its loading from a diffusers checkpoint folder, the configs and
checkpoints it refuses, and a text-to-video request that loads it instead of diffusers' VAE."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.errors import UserError
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.models.video_vae import ENCODER_PARTS, VideoVaeConfig, VideoVaeDecoder
from sgdiff.testing.compare import max_relative_error, randomize_weights
from sgdiff.testing.tiny_configs import WAN21_VAE, WAN22_VAE

TOLERANCE = 1e-5  # max |ours - reference| / max |reference|
CPU = torch.device("cpu")
DEMO_VAE = Path(__file__).resolve().parents[1] / "sgdiff" / "demo" / "models" / "video" / "vae"
WIDE_WAN21 = {  # its own decoder width, 2 resnets more per up block, 3 levels, time doubled by the last up block
    **WAN21_VAE,
    "decoder_base_dim": 6,
    "dim_mult": [1, 2, 3],
    "num_res_blocks": 2,
    "temperal_downsample": [True, False],
    "scale_factor_temporal": 2,
    "scale_factor_spatial": 4,
}
WAN22_TIME_FIRST = {**WAN22_VAE, "temperal_downsample": [True, True, False]}  # time doubled late (decoding)
WAN22_TI2V_5B = {  # Wan-AI/Wan2.2-TI2V-5B-Diffusers' vae/config.json (its latent statistics aside)
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
}
UNEVEN_SHORTCUT = {  # residual up blocks whose shortcut would need 1.5 copies of each channel (32 -> 12 x 4 pixels)
    **WAN21_VAE,
    "is_residual": True,
    "dim_mult": [1, 3, 8],
    "temperal_downsample": [False, True],
    "scale_factor_temporal": 2,
    "scale_factor_spatial": 4,
}


def reference_vae(config: dict, seed: int) -> AutoencoderKLWan:
    """Random weights; the output convolution scaled down so that few pixels reach the clamp at +-1."""
    torch.manual_seed(seed)
    vae = randomize_weights(AutoencoderKLWan(**config), seed)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.3)
        vae.decoder.conv_out.bias.mul_(0.3)
    return vae


def load_ours(folder: Path) -> VideoVaeDecoder:
    config = VideoVaeConfig.from_dict(read_json(folder / "config.json"))
    return load_own_model(build_on_meta(VideoVaeDecoder, config), folder, torch.float32, CPU, ignored=ENCODER_PARTS)


def decode_both(ours: VideoVaeDecoder, reference: AutoencoderKLWan, latents: torch.Tensor):
    with torch.no_grad():
        return ours.decode(latents, return_dict=False)[0], reference.decode(latents, return_dict=False)[0]


def assert_parity(ours: VideoVaeDecoder, reference: AutoencoderKLWan, shape: tuple[int, ...], seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    first, second = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    actual, expected = decode_both(ours, reference, first)
    config = ours.config
    b, _, frames, h, w = shape
    spatial, temporal = config.scale_factor_spatial, config.scale_factor_temporal
    assert actual.shape == expected.shape == (b, 3, temporal * (frames - 1) + 1, h * spatial, w * spatial)
    assert (expected.abs() < 1).float().mean() > 0.9  # the clamp hides little
    error = max_relative_error(actual, expected)
    assert error <= TOLERANCE
    # the output depends on the latents (and so on every weight along the way) far beyond the tolerance
    other, _ = decode_both(ours, reference, second)
    assert max_relative_error(other, expected) > 1000 * TOLERANCE
    if frames > 1:  # the cache carries latent frame 0 into the frames of the later chunks
        later = first.clone()
        later[:, :, 0] = second[:, :, 0]
        changed, _ = decode_both(ours, reference, later)
        assert max_relative_error(changed[:, :, 1:], expected[:, :, 1:]) > 1000 * TOLERANCE
    return error


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (WAN21_VAE, (2, 4, 3, 4, 6)),  # tiny Wan 2.1, batch 2, 3 latent frames -> 9 frames, h != w
        (WAN21_VAE, (1, 4, 1, 3, 3)),  # one latent frame: the first chunk alone
        (WIDE_WAN21, (1, 4, 4, 5, 3)),
        (WAN22_VAE, (2, 12, 3, 3, 4)),  # tiny Wan 2.2: residual up blocks, 2x2 patches
        (WAN22_TIME_FIRST, (1, 12, 3, 2, 2)),
    ],
    ids=["wan2.1", "wan2.1-one-frame", "wan2.1-wide", "wan2.2", "wan2.2-time-first"],
)
def test_decoder_matches_diffusers_on_random_weights(config, shape, tmp_path):
    reference = reference_vae(config, seed=sum(shape))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    assert_parity(load_ours(tmp_path), reference, shape, seed=len(shape))


def decoding_state(vae: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}


def test_the_full_size_wan21_decoder_matches_diffusers():
    """Wan 2.1's architecture (diffusers' defaults: 384 channels at the latents), random weights, small latents."""
    reference = reference_vae({}, seed=3)
    ours = build_on_meta(VideoVaeDecoder, VideoVaeConfig.from_dict(dict(reference.config)))
    ours.load_state_dict(decoding_state(reference), strict=True, assign=True)
    assert_parity(ours.eval(), reference, (1, 16, 2, 2, 3), seed=3)


def test_the_full_size_wan22_decoder_has_diffusers_names_and_shapes():
    """Wan2.2-TI2V-5B's VAE config (on meta: its numbers are the tiny Wan 2.2's test)."""
    with torch.device("meta"):
        reference = AutoencoderKLWan(**WAN22_TI2V_5B)
    ours = build_on_meta(VideoVaeDecoder, VideoVaeConfig.from_dict(dict(reference.config)))
    expected = {name: tensor.shape for name, tensor in decoding_state(reference).items()}
    assert {name: tensor.shape for name, tensor in ours.state_dict().items()} == expected


def test_decoder_matches_diffusers_on_the_demo_weights():
    reference = AutoencoderKLWan.from_pretrained(DEMO_VAE, dtype=torch.float32).eval()
    ours = load_ours(DEMO_VAE)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 8, 6, generator=g) * 0.3  # about the scale of its latents
    actual, expected = decode_both(ours, reference, latents)
    assert actual.shape == expected.shape == (1, 3, 9, 32, 24)
    assert max_relative_error(actual, expected) <= TOLERANCE and expected.std() > 0.05


def test_every_decoding_tensor_is_loaded_and_no_encoding_one(tmp_path):
    reference = reference_vae(WAN22_VAE, seed=5)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    theirs = reference.state_dict()
    ours = load_ours(tmp_path).state_dict()
    assert set(ours) == {k for k in theirs if not k.startswith(("encoder.", "quant_conv."))}
    assert "post_quant_conv.weight" in ours and "decoder.up_blocks.0.upsampler.time_conv.weight" in ours
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_a_checkpoint_with_other_names_is_refused_in_one_line(tmp_path):
    """Wan 2.1 weights under a config that says Wan 2.2's residual up blocks (upsampler, not upsamplers.0)."""
    reference_vae(WAN21_VAE, seed=1).save_pretrained(tmp_path, safe_serialization=True)
    config = read_json(tmp_path / "config.json")
    config = VideoVaeConfig.from_dict({**config, "is_residual": True, "decoder_base_dim": 4})
    model = build_on_meta(VideoVaeDecoder, config)
    with pytest.raises(UserError) as refused:
        load_own_model(model, tmp_path, torch.float32, CPU, ignored=ENCODER_PARTS)
    message = str(refused.value)
    assert "weights do not match VideoVaeDecoder (missing ['decoder.up_blocks.0.upsampler." in message
    assert "\n" not in message


def test_a_missing_decoder_tensor_is_refused(tmp_path):
    reference_vae(WAN21_VAE, seed=2).save_pretrained(tmp_path, safe_serialization=True)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["decoder.mid_block.attentions.0.to_qkv.bias"]
    save_file(state, weights)
    with pytest.raises(UserError, match=r"missing \['decoder.mid_block.attentions.0.to_qkv.bias'\]"):
        load_ours(tmp_path)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"temperal_downsample": [False, True]}, "temperal_downsample has 2 entries; dim_mult needs 3"),
        ({"latents_std": [1.0, 2.0]}, "latents_std has 2 entries, z_dim is 4: they must match"),
        ({"out_channels": 4}, "out_channels 4 with patch_size None does not decode to RGB"),
        ({"scale_factor_spatial": 16}, "scale_factor_spatial 16 does not match dim_mult and patch_size"),
        ({"scale_factor_temporal": 8}, "scale_factor_temporal 8 does not match temperal_downsample"),
        (UNEVEN_SHORTCUT, "up block 1 widens 32 -> 12 channels, which its shortcut cannot"),
        ({"dim_mult": []}, "dim_mult is empty"),
    ],
)
def test_unsupported_config_is_refused_in_one_line(change, named):
    with pytest.raises(UserError) as refused:
        VideoVaeConfig.from_dict({**WAN21_VAE, **change}, source="vae/config.json")
    message = str(refused.value)
    assert message.startswith("vae/config.json: ") and named in message and "\n" not in message


def test_cli_refuses_an_unsupported_vae_in_one_line(tiny_wan, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_wan("t2v"), model)
    config_path = model / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "latents_std": [1.0]}))
    args = ["generate", "--model-path", str(model), "--prompt", "p", "--height", "32", "--width", "32",
            "--num-frames", "5", "--no-save-output", "-q"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {config_path}: latents_std has 1 entries, z_dim is 4: they must match"]


def test_null_scale_factors_come_from_the_architecture():
    config = VideoVaeConfig.from_dict({**WAN22_VAE, "scale_factor_spatial": None, "scale_factor_temporal": None})
    assert (config.scale_factor_spatial, config.scale_factor_temporal) == (16, 4)


LOAD_AND_GENERATE = """
import json, sys
from sgdiff.engine.runner import ModelRunner

runner = ModelRunner(sys.argv[1])
runner.load()
after_load = sorted(m for m in sys.modules if m.split(".")[0] == "diffusers")
vae = next(stage.vae for stage in runner.pipeline.stages if stage.name == "decoding")
result = runner.generate(runner.sampling_params("a cube", height=32, width=32, num_frames=5, num_inference_steps=2))
after_generate = sorted(m for m in sys.modules if m.split(".")[0] == "diffusers")
print(json.dumps([type(vae).__name__, list(result.videos.shape), after_load, after_generate]))
"""


def test_a_text_to_video_load_imports_no_diffusers(tiny_wan):
    done = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(tiny_wan("t2v"))],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    vae, shape, after_load, after_generate = json.loads(done.stdout.strip().splitlines()[-1])
    assert vae == "VideoVaeDecoder" and shape == [1, 5, 32, 32, 3]
    assert after_load == []
    assert after_generate == []  # the checkpoint's UniPC scheduler is sgdiff's own (sgdiff/families/wan/unipc.py)
