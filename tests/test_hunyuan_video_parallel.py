"""N CPU processes (gloo) give HunyuanVideo's single-process result: the pipeline with true CFG (a prompt of 7
Llama tokens against a negative prompt of 3; 27 video tokens, uneven over 2 ranks) under Ulysses-2, Ring-2
and CFG parallel, with the same frames; the transformer sharded by the family's plan
(families/hunyuan_video/shard.py) on a batch of 2 with 45 video tokens and 5 text tokens, and on a model
without single-stream blocks; `sgdiff generate --num-gpus 2` writes the one process's frames. One spawn
serves every mode (sgdiff/testing/hunyuan_parallel.py). Ulysses x Ring on 4 processes runs the same plan
(the attention's layout does the rest): left to the 4-process FLUX tests, to keep the suite short."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import ParallelConfig, RuntimeConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError
from sgdiff.io.video import read_png_frames
from sgdiff.testing.distributed import run_on_ranks
from sgdiff.testing.hunyuan_parallel import parallel_outputs
from sgdiff.testing.tiny_hunyuan_video import build_tiny_hunyuan_video

TWO = {
    "ulysses-2": ParallelConfig(2),
    "ring-2": ParallelConfig(2, ring_degree=2),
    "cfg-2": ParallelConfig(2, enable_cfg_parallel=True),
}
PROMPT = "a red cube on the table"  # 7 Llama tokens after the template's system part; "blurry photo": 3
# 48x48 pixels, 9 frames: 3 latent frames of 6x6 (8x, 4x VAE), 3 x 3x3 = 27 video tokens after 2x2 patches
REQUEST = dict(
    height=48, width=48, num_frames=9, num_inference_steps=3, negative_prompt="blurry photo", true_cfg_scale=4.0, seed=7
)
# the transformer alone: (batch, latent frames x rows x cols, text tokens, single-stream blocks); 45 and 27 tokens
CASES = {"batch-2": (2, (3, 6, 10), 5, 2), "no-single-blocks": (1, (3, 6, 6), 7, 0)}
LOCAL_VIDEO_TOKENS = {2: {"batch-2": 23, "no-single-blocks": 14}}


@pytest.fixture(scope="module")
def tiny_hunyuan(tmp_path_factory) -> str:
    return str(build_tiny_hunyuan_video(tmp_path_factory.mktemp("hunyuan-video") / "tiny"))


@pytest.fixture(scope="module")
def single_process(tiny_hunyuan):
    engine = ModelRunner(tiny_hunyuan, runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    return engine.generate(engine.sampling_params(PROMPT, **REQUEST))


@pytest.fixture(scope="module")
def two_processes(tiny_hunyuan) -> list[dict]:
    return run_on_ranks(ParallelConfig(2), parallel_outputs, TWO, (tiny_hunyuan, PROMPT, REQUEST), CASES)


def check_pipeline(per_rank: list[dict], mode: str, single_process) -> None:
    for rank, outputs in enumerate(per_rank):
        out = outputs[mode]["pipeline"]
        difference = (out["latents"] - single_process.latents).abs().max().item()
        assert difference <= 1e-4, f"{mode} rank {rank}: max abs diff {difference}"
        if rank == 0:  # (rank 0 decodes): the same frames, but for a pixel rounded the other way here and there
            pixels = np.abs(out["videos"].astype(int) - single_process.videos.astype(int))
            assert pixels.max() <= (0 if mode == "cfg-2" else 1), f"{mode}: {pixels.max()}"  # observed 0 and 1
        branches = "CfgParallelBranches" if mode.startswith("cfg") else "function"
        assert out["denoising"] == (branches, "guided_velocity")  # (true CFG: both branches each step)


def check_transformer(per_rank: list[dict], mode: str, degree: int) -> None:
    for rank, outputs in enumerate(per_rank):
        for case, out in outputs[mode]["transformer"].items():
            worst = max(out["sharded"])
            assert worst <= 1e-5 * out["whole"].abs().max(), f"{mode} {case} rank {rank}: {out['sharded']}"
            assert out["after_remove"] == 0  # the hooks taken off: the single-process model again
            # each rank's norm_out and proj_out ran on its share of the video tokens (joined after proj_out)
            assert out["proj_out_tokens"] == LOCAL_VIDEO_TOKENS[degree][case]


@pytest.mark.slow
@pytest.mark.parametrize("mode", TWO)
def test_two_processes_give_the_single_process_video(mode, two_processes, single_process):
    check_pipeline(two_processes, mode, single_process)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ulysses-2", "ring-2"])
def test_the_sharded_transformer_gives_the_whole_output_on_two_processes(mode, two_processes):
    check_transformer(two_processes, mode, 2)


def test_ulysses_needs_a_degree_that_divides_the_heads():
    """The tiny model's 2 heads cannot go over Ulysses-4: check_heads' error, naming the split that fits."""
    from sgdiff.families.hunyuan_video import FAMILY
    from sgdiff.models.hunyuan_video import HunyuanVideoTransformer, HunyuanVideoTransformerConfig
    from sgdiff.testing.hunyuan_parallel import TINY

    model = HunyuanVideoTransformer(HunyuanVideoTransformerConfig(**TINY))
    groups = SimpleNamespace(ulysses_degree=4, ring_degree=1)
    with pytest.raises(UserError) as error:
        FAMILY.shard(model, None, groups)  # type: ignore[arg-type]  # (refused before either is used)
    message = error.value.message
    assert message.startswith("`ulysses_degree` 4 must divide the model's 2 attention heads"), message
    assert "pass `ulysses_degree` 2 `ring_degree` 2" in message and error.value.field == "ulysses_degree"


@pytest.mark.slow
def test_sgdiff_generate_on_two_processes_writes_the_single_process_frames(tiny_hunyuan, tmp_path):
    """`--num-gpus 2` (spawned CPU processes) writes the one process's PNG frames: pixel for pixel with
    `--enable-cfg-parallel` (each rank runs one branch as the one process does), but for a pixel rounded the
    other way here and there under Ulysses-2 (float32 sums in another order: latents within 1e-4)."""

    def frames(out: Path, *flags: str) -> np.ndarray:
        args = ["generate", "--model-path", tiny_hunyuan, "--prompt", PROMPT, "--negative-prompt", "blurry photo",
                "--true-cfg-scale", "4", "--height", "48", "--width", "48", "--num-frames", "9", "--steps", "2",
                "--seed", "3", "--device", "cpu", "--output-format", "png", "--output-path", str(out), "-q",
                *flags]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        (folder,) = [Path(line) for line in result.stdout.splitlines() if line]
        return read_png_frames(folder)

    alone = frames(tmp_path / "one")
    assert alone.shape == (9, 48, 48, 3) and alone.std() > 1  # a decoded video, not a constant
    ulysses = np.abs(frames(tmp_path / "ulysses", "--num-gpus", "2").astype(int) - alone.astype(int))
    # observed: 3 of the 62,208 values 1 off
    assert ulysses.max() <= 1 and (ulysses > 0).mean() < 1e-3, (ulysses.max(), (ulysses > 0).sum())
    assert np.array_equal(frames(tmp_path / "cfg", "--num-gpus", "2", "--enable-cfg-parallel"), alone)
