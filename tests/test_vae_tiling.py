"""--vae-tiling: sgdiff's own VAE decoders decode in diffusers' tiles (tiled decode equal to diffusers'
on the same weights, fp32, CPU), a batch one item at a time with the same output, and the flag reaches
every family's VAE."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from typer.testing import CliRunner

from sgdiff.cli import main as cli
from sgdiff.config import RuntimeConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.models.tiles import blend_edge
from sgdiff.pipeline.base import ParallelMode
from sgdiff.pipeline.stages.decoding import to_uint8_images
from sgdiff.testing.tiny_configs import FLUX_VAE, WAN21_VAE, WAN22_VAE
from sgdiff.testing.vae_tiles import set_tiles, tiny_vaes

# tiles of 32x32 pixels every 24 (Wan 2.1: 4 latents every 3; Wan 2.2, 16x: 64 every 48), blended over 8
WAN_TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                 tile_sample_stride_width=24)  # fmt: skip
WAN22_TILES = {name: 2 * value for name, value in WAN_TILES.items()}
# FLUX's tiny VAE (2x): tiles of 16 latents (32 pixels) every 12, blended over 8 pixels
IMAGE_TILES = dict(tile_sample_min_size=32, tile_latent_min_size=16)
VIDEO_CASES = {  # config, latent shape, tiles, the tile grid they make
    "wan2.1-one-row": (WAN21_VAE, (1, 4, 2, 3, 13), WAN_TILES, (1, 5)),
    "wan2.1-batch-2": (WAN21_VAE, (2, 4, 1, 5, 7), WAN_TILES, (2, 3)),  # one latent frame: the first chunk alone
    "wan2.2": (WAN22_VAE, (1, 12, 2, 5, 4), WAN22_TILES, (2, 2)),
}


def frames(video: torch.Tensor):
    """[B, 3, T, H, W] in [-1, 1] -> uint8 frames, as the decoding stage makes them."""
    return to_uint8_images(video.transpose(1, 2).flatten(0, 1)).astype(int)


def assert_close_but_tiled(tiled: torch.Tensor, untiled: torch.Tensor, other: torch.Tensor) -> None:
    """The tiled decode is not the untiled one (tiling ran), yet far nearer to it than the decode of other
    latents is (the tiles sit where they belong)."""
    assert (tiled - untiled).abs().max() > 1e-2
    assert (tiled - untiled).abs().mean() < 0.7 * (other - untiled).abs().mean()


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_wan_tiled_decode_equals_diffusers_tiled_decode(case):
    config, shape, tiles, grid_shape = VIDEO_CASES[case]
    ours, reference = tiny_vaes("video", config, seed=len(case))
    g = torch.Generator().manual_seed(1)
    latents, other = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    with torch.no_grad():
        untiled, other_untiled = ours.decode(latents)[0], ours.decode(other)[0]
        set_tiles(ours, tiles)
        reference.enable_tiling(**tiles)
        grid = ours.tile_grid(shape)
        actual, expected = ours.decode(latents)[0], reference.decode(latents, return_dict=False)[0]
    assert grid is not None and grid.shape == grid_shape
    assert actual.shape == expected.shape == untiled.shape
    assert (actual - expected).abs().max() <= 1 / 255
    assert abs(frames(actual) - frames(expected)).max() <= 1
    assert_close_but_tiled(actual, untiled, other_untiled)


def test_wan_slicing_decodes_one_video_at_a_time_with_the_same_output():
    config, shape, tiles, _ = VIDEO_CASES["wan2.1-batch-2"]
    ours, reference = tiny_vaes("video", config, seed=3)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    batches: list[int] = []
    ours.post_quant_conv.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    with torch.no_grad():
        whole = ours.decode(latents)[0]
        ours.enable_slicing()
        sliced = ours.decode(latents)[0]
        assert batches == [2, 1, 1]
        set_tiles(ours, tiles)
        reference.enable_tiling(**tiles)
        reference.enable_slicing()
        sliced_tiles, expected = ours.decode(latents)[0], reference.decode(latents, return_dict=False)[0]
    assert batches[3:] == [1] * 12  # 6 tiles, each video on its own
    assert (sliced - whole).abs().max() <= 1e-5  # (a batch of one rounds a little differently)
    assert (sliced_tiles - expected).abs().max() <= 1 / 255


def test_image_tiled_decode_equals_diffusers_tiled_decode():
    """FLUX's VAE (AutoencoderKL): 3x3 tiles, a batch of two, one image at a time too."""
    ours, reference = tiny_vaes("image", FLUX_VAE, seed=4)
    g = torch.Generator().manual_seed(3)
    shape = (2, FLUX_VAE["latent_channels"], 30, 34)
    latents, other = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    with torch.no_grad():
        untiled, other_untiled = ours.decode(latents), ours.decode(other)
        set_tiles(ours, IMAGE_TILES)
        set_tiles(reference, IMAGE_TILES)
        grid = ours.tile_grid(shape)
        actual, expected = ours.decode(latents), reference.decode(latents, return_dict=False)[0]
        ours.enable_slicing()
        reference.enable_slicing()
        sliced, sliced_expected = ours.decode(latents), reference.decode(latents, return_dict=False)[0]
    assert grid is not None and grid.shape == (3, 3)
    assert actual.shape == expected.shape == untiled.shape == (2, 3, 60, 68)
    assert (actual - expected).abs().max() <= 1 / 255 and (sliced - sliced_expected).abs().max() <= 1 / 255
    assert (sliced - actual).abs().max() <= 1e-5
    assert_close_but_tiled(actual, untiled, other_untiled)


def test_the_default_tiles_are_diffusers():
    ours, reference = tiny_vaes("video", WAN21_VAE, seed=0)
    names = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height", "tile_sample_stride_width")
    assert [getattr(ours, n) for n in names] == [getattr(reference, n) for n in names] == [256, 256, 192, 192]
    ours.enable_tiling()
    assert ours.tile_grid((1, 4, 3, 32, 32)) is None  # 256x256 pixels: one tile, decoded whole
    assert ours.tile_grid((1, 4, 3, 33, 32)).shape == (2, 2)  # type: ignore[union-attr]  # (both sides, once one is over)
    image, image_reference = tiny_vaes("image", {**FLUX_VAE, "sample_size": 64}, seed=0)
    assert (image.tile_sample_min_size, image.tile_latent_min_size, image.tile_overlap_factor) == (
        image_reference.tile_sample_min_size, image_reference.tile_latent_min_size, image_reference.tile_overlap_factor
    ) == (64, 32, 0.25)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blending_rounds_as_diffusers(dtype):
    """One ramp over a whole edge at once, each product and the sum rounded as diffusers' row-by-row loop
    rounds them (bf16 too)."""
    g = torch.Generator().manual_seed(5)
    above, left = torch.randn(2, 3, 4, 13, 11, generator=g).to(dtype), torch.randn(2, 3, 4, 9, 6, generator=g).to(dtype)
    tile = torch.randn(2, 3, 4, 9, 11, generator=g).to(dtype)
    expected = AutoencoderKLWan.blend_h(None, left, AutoencoderKLWan.blend_v(None, above, tile.clone(), 7), 5)  # type: ignore[arg-type]
    blend_edge(above, tile, 7, dim=-2)
    blend_edge(left, tile, 5, dim=-1)
    assert torch.equal(tile, expected)
    image, image_tile = above[:, :, 0], torch.randn(2, 3, 9, 11, generator=g).to(dtype)
    expected = AutoencoderKL.blend_v(None, image, image_tile.clone(), 12)  # type: ignore[arg-type]  # (more than fits: 9)
    blend_edge(image, image_tile, 12, dim=-2)
    assert torch.equal(image_tile, expected)


def decoding_vae(runner: ModelRunner):
    assert runner.pipeline is not None
    (stage,) = [stage for stage in runner.pipeline.stages if stage.name == "decoding"]
    return stage


@pytest.mark.parametrize("model", ["wan", "flux"])
def test_the_toggle_tiles_every_vae_of_the_pipeline(model, tiny_wan, tiny_flux_dev):
    path = str(tiny_wan("t2v") if model == "wan" else tiny_flux_dev)
    for tiling in (False, True):
        runner = ModelRunner(path, runtime=RuntimeConfig(device="cpu", dtype="fp32", vae_tiling=tiling))
        runner.load()
        stage = decoding_vae(runner)
        assert (stage.vae.use_tiling, stage.vae.use_slicing) == (tiling, tiling)
        assert stage.parallel is ParallelMode.TILE_SPLIT  # sgdiff's own decoder: its tiles can go to several ranks


def test_the_toggle_tiles_diffusers_vaes(tiny_wan):
    """Wan image-to-video decodes (and encodes) with diffusers' AutoencoderKLWan: its own enable_tiling."""
    runner = ModelRunner(str(tiny_wan("i2v")), runtime=RuntimeConfig(device="cpu", dtype="fp32", vae_tiling=True))
    runner.load()
    stage = decoding_vae(runner)
    assert isinstance(stage.vae, AutoencoderKLWan) and stage.vae.use_tiling and stage.vae.use_slicing
    assert stage.parallel is ParallelMode.RANK0_ONLY


def test_the_flag_reaches_the_runtime_config(monkeypatch):
    received: list = []
    monkeypatch.setattr(cli, "run", lambda request, quiet: received.append(request))
    for args in ([], ["--vae-tiling"]):
        result = CliRunner().invoke(cli.app, ["generate", "--model-path", "m", "--prompt", "p", *args])
        assert result.exit_code == 0, result.output
    assert [request.runtime.vae_tiling for request in received] == [False, True]
