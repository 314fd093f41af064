"""Prompts encoded while the transformer still loads (stages/text_encoding.py, encode_ahead): the request
then skips its text encoders, with the very outputs it would have had, and a request unlike those
encoded ahead is encoded as before."""

from __future__ import annotations

import threading

import pytest
import torch

from sgdiff.config import RuntimeConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError
from sgdiff.pipeline.base import NullEvents
from sgdiff.pipeline.components import load_side_by_side


class StageOrder(NullEvents):
    def __init__(self):
        self.stages: list[str] = []

    def stage_started(self, name: str) -> None:
        self.stages.append(f"started {name}")

    def stage_finished(self, name: str, seconds: float) -> None:
        self.stages.append(f"finished {name}")


def counting_encoder(runner: ModelRunner) -> list[list[str]]:
    """The texts the loaded pipeline's text stage hands its encoders from now on, call by call."""
    stage = next(stage for stage in runner.pipeline.stages if stage.name == "text_encoding")
    calls: list[list[str]] = []
    encode = stage.encode
    stage.encode = lambda prompts, params: (calls.append(prompts), encode(prompts, params))[1]
    return calls


def loaded(path, ahead_fields: list[dict] | None = None, events=None) -> ModelRunner:
    runner = ModelRunner(str(path), runtime=RuntimeConfig(device="cpu"), events=events or NullEvents())
    ahead = [runner.sampling_params(**fields) for fields in ahead_fields or []]
    runner.load(encode_ahead=ahead)
    return runner


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_a_prompt_encoded_ahead_gives_the_same_output_without_encoding_in_the_request(model, tiny_flux_dev, tiny_wan):
    """With CFG (FLUX's true CFG with a negative prompt, Wan's guidance): prompt and negative prompt both
    come from the load; the latents are those of a runner that encodes in the request."""
    path = tiny_flux_dev if model == "flux" else tiny_wan("t2v")
    fields = dict(prompt="a red cube", height=32, width=32, num_inference_steps=2, seed=3, max_sequence_length=16)
    fields |= {"negative_prompt": "blurry", "true_cfg_scale": 2.0} if model == "flux" else {"num_frames": 5}
    events = StageOrder()
    ahead = loaded(path, [fields], events)
    stages = events.stages
    text_parts = ["text_encoder", "text_encoder_2"] if model == "flux" else ["text_encoder"]
    began = stages.index("started load prompt embeddings")
    assert all(stages.index(f"finished load {part}") < began for part in text_parts)
    assert "finished load prompt embeddings" in stages
    calls = counting_encoder(ahead)
    result = ahead.generate(ahead.sampling_params(**fields))
    assert calls == []

    plain = loaded(path)
    calls = counting_encoder(plain)
    expected = plain.generate(plain.sampling_params(**fields))
    assert calls == [["a red cube"], ["blurry" if model == "flux" else ""]]
    assert torch.equal(result.latents, expected.latents)

    calls = counting_encoder(ahead)  # each text encoded ahead serves one request: the next encodes its own
    again = ahead.generate(ahead.sampling_params(**fields))
    assert len(calls) == 2 and torch.equal(again.latents, expected.latents)


def test_a_request_unlike_those_encoded_ahead_is_encoded_in_the_request(tiny_flux_dev):
    """Another prompt, or the same at another max_sequence_length: encoded afresh, never served another
    text's embeddings (which would change the image)."""
    fields = dict(height=32, width=32, num_inference_steps=2, seed=3, max_sequence_length=16)
    ahead = loaded(tiny_flux_dev, [dict(prompt="a red cube", **fields)])
    plain = loaded(tiny_flux_dev)
    calls = counting_encoder(ahead)
    blue = ahead.generate(ahead.sampling_params("a blue cube", **fields))
    assert calls == [["a blue cube"]]
    assert torch.equal(blue.latents, plain.generate(plain.sampling_params("a blue cube", **fields)).latents)
    red = plain.generate(plain.sampling_params("a red cube", **fields)).latents
    assert (blue.latents - red).abs().max() > 0.05  # the prompts' outputs differ: a mix-up would show

    longer = dict(fields, max_sequence_length=32)
    calls.clear()
    red_32 = ahead.generate(ahead.sampling_params("a red cube", **longer))
    assert calls == [["a red cube"]]
    assert torch.equal(red_32.latents, plain.generate(plain.sampling_params("a red cube", **longer)).latents)


def test_sgdiff_generate_encodes_its_first_prompts_while_loading(tmp_path):
    """The perf dump's load parts show the prompt embeddings, begun after the text encoders loaded."""
    import json

    from typer.testing import CliRunner

    from sgdiff.cli.main import app

    dump = tmp_path / "perf.json"
    result = CliRunner().invoke(app, ["generate", "--prompt", "a red cube", "--steps", "1", "--height", "32",
                                      "--width", "32", "--output-path", str(tmp_path), "--quiet",
                                      "--perf-dump-path", str(dump)])  # fmt: skip
    assert result.exit_code == 0, result.output
    parts = json.loads(dump.read_text())["load_part_spans"]
    assert parts["prompt embeddings"][0] >= max(
        span[1] for name, span in parts.items() if name.startswith("text_encoder")
    )


def test_on_two_processes_rank_0_encodes_the_first_prompts_while_loading(tiny_flux_dev, tmp_path):
    """`--num-gpus 2` (CPU processes): rank 0 encodes the prompts once its text encoders are in (its load
    parts, forwarded to the front, show the prompt embeddings), and the image is the one process's."""
    import json

    from typer.testing import CliRunner

    from sgdiff.cli.main import app
    from sgdiff.testing.compare import read_png

    def generate(out, *flags: str):
        args = ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "a red cube", "--steps", "2",
                "--height", "32", "--width", "32", "--seed", "5", "--output-path", str(out), "--quiet",
                "--device", "cpu", "--perf-dump-path", str(out / "perf.json"), *flags]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads((out / "perf.json").read_text()), read_png(next(out.glob("*.png"))).astype(int)

    dump, image = generate(tmp_path / "two", "--num-gpus", "2")
    parts = dump["load_part_spans"]
    assert parts["prompt embeddings"][0] >= max(span[1] for n, span in parts.items() if n.startswith("text_encoder"))
    _, alone = generate(tmp_path / "one")
    assert abs(image - alone).max() <= 2


class Recorder(NullEvents):
    def __init__(self):
        self.finished: list[str] = []

    def stage_finished(self, name: str, seconds: float) -> None:
        self.finished.append(name)


def test_a_follower_runs_on_the_parts_it_needs_while_others_still_load():
    """It starts once its parts are loaded, before a slow part has finished, and is returned as a part."""
    slow_may_finish = threading.Event()

    def slow() -> str:
        assert slow_may_finish.wait(10), "the follower never ran while this part loaded"
        return "transformer"

    def follow(parts: dict) -> str:
        slow_may_finish.set()
        return f"{parts['text']} encoded"

    events = Recorder()
    parts = load_side_by_side(events, torch.device("cpu"), {"text": lambda: "prompt", "transformer": slow},
                              followers={"embeddings": (("text",), follow)})  # fmt: skip
    assert parts == {"text": "prompt", "transformer": "transformer", "embeddings": "prompt encoded"}
    assert events.finished.index("load embeddings") < events.finished.index("load transformer")


def test_a_follower_whose_part_fails_never_runs_and_the_part_s_error_is_raised():
    ran = []

    def broken() -> None:
        raise UserError("the text_encoder folder is broken")

    with pytest.raises(UserError, match="the text_encoder folder is broken"):
        load_side_by_side(NullEvents(), torch.device("cpu"), {"text": broken, "vae": lambda: "vae"},
                          followers={"embeddings": (("text",), lambda parts: ran.append(parts))})  # fmt: skip
    assert ran == []
