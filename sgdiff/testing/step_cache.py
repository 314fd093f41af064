"""A run_on_ranks function for the step cache's parallel tests (tests/test_step_cache.py)."""

from __future__ import annotations

from sgdiff.parallel.groups import ParallelGroups


def cached_latents(groups: ParallelGroups, model: str, speed, prompt: str, flags: dict) -> tuple:
    """This rank's final latents and skipped steps (per branch) of one request on a pipeline made parallel
    as the engine's workers make it, with the speed toggles `speed` (a SpeedConfig)."""
    from sgdiff.config import RuntimeConfig
    from sgdiff.engine.runner import ModelRunner
    from sgdiff.engine.worker import load_for_rank, make_parallel

    engine = ModelRunner(model, runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))
    load_for_rank(engine, groups)
    with make_parallel(engine, groups):
        result = engine.generate(engine.sampling_params(prompt, **flags))
    return result.latents, result.skipped_steps


def cached_latents_each(groups: ParallelGroups, model: str, speeds: list, prompt: str, flags: dict) -> list:
    """cached_latents for each SpeedConfig of `speeds` in turn, in one start of the ranks (a start costs more
    than a request of a tiny model)."""
    return [cached_latents(groups, model, speed, prompt, flags) for speed in speeds]
