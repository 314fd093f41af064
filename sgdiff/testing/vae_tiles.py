"""Tiny VAEs of sgdiff's own beside diffusers' on the same random weights, and run_on_ranks functions
that decode their tiles over several processes (tests of models/tiles.py and parallel/vae.py)."""

from __future__ import annotations

from typing import Any

import torch

from sgdiff.parallel.groups import ParallelGroups


def tiny_vaes(kind: str, config: dict, seed: int) -> tuple[Any, Any]:
    """(sgdiff's decoder, diffusers' VAE) with the same random weights: kind "video" (Wan's:
    VideoVaeDecoder, AutoencoderKLWan; its output convolution scaled down so that few pixels reach the
    clamp) or "image" (ImageVaeDecoder, AutoencoderKL). The same on every process for the same seed."""
    from diffusers import AutoencoderKL, AutoencoderKLWan

    from sgdiff.models.image_vae import ImageVaeConfig, ImageVaeDecoder
    from sgdiff.models.loading import build_on_meta
    from sgdiff.models.video_vae import VideoVaeConfig, VideoVaeDecoder
    from sgdiff.testing.compare import randomize_weights

    torch.manual_seed(seed)
    if kind == "video":
        reference: Any = randomize_weights(AutoencoderKLWan(**config), seed)
        with torch.no_grad():
            reference.decoder.conv_out.weight.mul_(0.3)
            reference.decoder.conv_out.bias.mul_(0.3)
        ours: Any = build_on_meta(VideoVaeDecoder, VideoVaeConfig.from_dict(dict(reference.config)))
    else:
        reference = randomize_weights(AutoencoderKL(**config), seed)
        ours = build_on_meta(ImageVaeDecoder, ImageVaeConfig.from_dict(dict(reference.config)))
    decoding = {k: v for k, v in reference.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}
    ours.load_state_dict(decoding, strict=True, assign=True)
    return ours.eval(), reference.eval()


def set_tiles(vae: Any, tiles: dict[str, int]) -> None:
    """Tiling on, with these tile attributes (diffusers' names: tile_sample_min_height, ...)."""
    vae.enable_tiling()
    for name, value in tiles.items():
        setattr(vae, name, value)


def count_tiles(vae: Any) -> list[int]:
    """A list that grows by one each time `vae` decodes a tile."""
    calls: list[int] = []
    decode_tile = vae.decode_tile

    def counted(z: torch.Tensor, region: tuple[slice, slice]) -> torch.Tensor:
        calls.append(1)
        return decode_tile(z, region)

    vae.decode_tile = counted
    return calls


def decode_over_ranks(groups: ParallelGroups, cases: list[tuple[str, dict, tuple[int, ...], dict]]) -> list:
    """Each case (kind, config, latent shape, tile attributes) decoded with its tiles over the ranks
    (parallel/vae.py), fp32: per case (rank 0's output or None, the tiles this rank decoded, every tile)."""
    from sgdiff.parallel.vae import TilesOverRanks

    results = []
    for seed, (kind, config, shape, tiles) in enumerate(cases):
        vae, _ = tiny_vaes(kind, config, seed)
        set_tiles(vae, tiles)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        calls = count_tiles(vae)
        whole = (lambda z, vae=vae: vae.decode(z)[0]) if kind == "video" else vae.decode
        with torch.no_grad():
            output = TilesOverRanks(vae, whole, groups)(latents)
        grid = vae.tile_grid(shape)
        results.append((output, len(calls), grid.shape[0] * grid.shape[1]))
    return results


def decode_here(cases: list[tuple[str, dict, tuple[int, ...], dict]]) -> list[torch.Tensor]:
    """decode_over_ranks's cases decoded in this one process."""
    outputs = []
    for seed, (kind, config, shape, tiles) in enumerate(cases):
        vae, _ = tiny_vaes(kind, config, seed)
        set_tiles(vae, tiles)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            decoded = vae.decode(latents)
        outputs.append(decoded[0] if kind == "video" else decoded)
    return outputs


def tiled_pipeline_videos(groups: ParallelGroups | None, model: str, flags: dict, tiles: dict[str, int]) -> tuple:
    """A text-to-video request with --vae-tiling (and these tile attributes) on a pipeline made parallel
    as the engine's workers make it (`groups`; None: this one process): (the videos, None on ranks other
    than 0; how many tiles this rank decoded)."""
    from sgdiff.config import RuntimeConfig
    from sgdiff.engine.runner import ModelRunner
    from sgdiff.engine.worker import load_for_rank, make_parallel

    runner = ModelRunner(model, runtime=RuntimeConfig(device="cpu", dtype="fp32", vae_tiling=True))
    if groups is None:
        runner.load()
    else:
        load_for_rank(runner, groups)
    assert runner.pipeline is not None  # (loaded)
    (vae,) = [stage.vae for stage in runner.pipeline.stages if stage.name == "decoding"]  # type: ignore[attr-defined]
    set_tiles(vae, tiles)
    calls = count_tiles(vae)
    params = runner.sampling_params("a red cube", **flags)
    if groups is None:
        return runner.generate(params).videos, len(calls)
    with make_parallel(runner, groups):
        return runner.generate(params).videos, len(calls)
