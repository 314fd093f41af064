"""Preset selection and the one merge function: flags always beat presets, presets beat defaults."""

from __future__ import annotations

from functools import partial

import pytest

from sgdiff.config import builtin_presets, load_preset, merge_layers, select_preset
from sgdiff.errors import UserError
from sgdiff.families.flux.sampling import FluxSampling
from sgdiff.pipeline.registry import families
from sgdiff.sampling import build_sampling_params, sampling_defaults, sampling_fields

build_flux_params = partial(build_sampling_params, FluxSampling)

DEV_CONFIG = {"guidance_embeds": True, "num_layers": 19}
SCHNELL_CONFIG = {"guidance_embeds": False, "num_layers": 19}


def test_builtin_presets_are_found():
    presets = builtin_presets()
    assert {"flux.1-dev", "flux.1-schnell"} <= set(presets)
    assert presets["flux.1-schnell"].sampling["num_inference_steps"] == 4
    assert presets["flux.1-dev"].sampling["num_inference_steps"] == 28
    assert presets["flux.1-dev"].schedule["use_dynamic_shifting"] is True
    assert presets["flux.1-schnell"].schedule["use_dynamic_shifting"] is False


@pytest.mark.parametrize(
    ("model_path", "config", "expected"),
    [
        ("black-forest-labs/FLUX.1-dev", SCHNELL_CONFIG, "flux.1-dev"),  # the id wins over the config
        ("black-forest-labs/FLUX.1-schnell", DEV_CONFIG, "flux.1-schnell"),
        ("/models/my-finetune", DEV_CONFIG, "flux.1-dev"),  # no id: chosen from the config
        ("/models/my-finetune", SCHNELL_CONFIG, "flux.1-schnell"),
    ],
)
def test_preset_chosen_from_model_id_then_config(model_path, config, expected):
    assert select_preset(None, model_path, "FluxPipeline", config).name == expected


def test_explicit_preset_wins_over_id_and_config():
    preset = select_preset("flux.1-schnell", "black-forest-labs/FLUX.1-dev", "FluxPipeline", DEV_CONFIG)
    assert preset.name == "flux.1-schnell"


def test_no_preset_for_unknown_pipeline():
    assert select_preset(None, "/x", "SomethingElse", {}) is None


def test_preset_from_toml_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[sampling]\nnum_inference_steps = 9\nheight = 512\n')
    preset = load_preset(str(path))
    params = build_flux_params("a cat", preset, {})
    assert (params.num_inference_steps, params.height, params.width) == (
        9,
        512,
        sampling_defaults(FluxSampling)["width"],
    )


def test_unknown_preset_names_the_choices():
    with pytest.raises(UserError, match="unknown preset 'nope'.*flux.1-dev"):
        load_preset("nope")


def test_preset_with_unknown_key_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[sampling]\nstepz = 3\n")
    with pytest.raises(UserError, match="unknown \\[sampling\\] keys \\['stepz'\\]"):
        build_flux_params("p", load_preset(str(path)), {})


def test_every_builtin_preset_fits_its_family():
    """A built-in preset's [sampling] holds fields of the family its [match] names, of their types."""
    for preset in builtin_presets().values():
        if "pipeline" in preset.match:
            family = families()[preset.match["pipeline"]]
        else:  # matched by model id alone (FastWan): the one family whose fields it sets
            (family,) = {f for f in families().values() if set(preset.sampling) <= sampling_fields(f.sampling)}
        build_sampling_params(family.sampling, "p", preset, {})


def test_explicit_flag_wins_even_when_equal_to_the_default():
    schnell = load_preset("flux.1-schnell")
    # 28 is the library default; given explicitly it must beat schnell's 4
    assert build_flux_params("p", schnell, {"num_inference_steps": 28}).num_inference_steps == 28
    assert build_flux_params("p", schnell, {}).num_inference_steps == 4


def test_merge_layers_ignores_none_and_later_wins():
    assert merge_layers({"a": 1, "b": 2}, None, {"a": None, "b": 3}, {"c": 4}) == {"a": 1, "b": 3, "c": 4}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"height": 1000}, "height must be a positive multiple of 16 up to 8192, got 1000"),
        ({"width": 0}, "width must be a positive multiple of 16 up to 8192, got 0"),
        ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 10000"),
        ({"num_outputs_per_prompt": 0}, "num_outputs_per_prompt must be between 1 and 64"),
        ({"generator_device": "tpu"}, "generator_device must be 'cpu' or 'cuda'"),
        ({"true_cfg_scale": 0.5}, "true_cfg_scale must be >= 1"),
    ],
)
def test_bad_values_are_refused(flags, message):
    with pytest.raises(UserError, match=message) as caught:
        build_flux_params("p", None, flags)
    assert caught.value.field == next(iter(flags))  # the error names the field at fault


def test_empty_prompt_is_refused():
    with pytest.raises(UserError, match="the prompt is empty"):
        build_flux_params("   ", None, {})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[sampling]\nheight = "abc"\n', "height must be an integer, got 'abc'"),
        ("[sampling]\nguidance_scale = true\n", "guidance_scale must be a number, got True"),
        ("[sampling]\nnegative_prompt = 3\n", "negative_prompt must be a string, got 3"),
    ],
)
def test_preset_values_of_the_wrong_type_are_refused(tmp_path, toml, message):
    path = tmp_path / "typed.toml"
    path.write_text(toml)
    with pytest.raises(UserError, match=message):
        build_flux_params("p", load_preset(str(path)), {})


def test_library_callers_get_unknown_and_mistyped_parameters_refused():
    with pytest.raises(UserError, match="unknown sampling parameters \\['stepz'\\]"):
        build_flux_params("p", None, {"stepz": 3})
    with pytest.raises(UserError, match="height must be an integer"):
        build_flux_params("p", None, {"height": 512.0})


def test_a_preset_file_builds_on_the_models_own_preset(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[sampling]\nnum_inference_steps = 9\n")
    preset = select_preset(str(path), "/models/my-finetune", "FluxPipeline", SCHNELL_CONFIG)
    schnell = load_preset("flux.1-schnell")
    assert preset.sampling == {**schnell.sampling, "num_inference_steps": 9}  # not the library defaults
    assert preset.schedule == schnell.schedule


def test_a_preset_for_another_pipeline_is_refused_by_what_it_is_for():
    with pytest.raises(UserError, match="preset wan2.1-t2v-1.3b is for WanPipeline models, and this checkpoint is a "
                                        "FluxPipeline: choose .*flux.1-dev, flux.1-schnell") as caught:  # fmt: skip
        select_preset("wan2.1-t2v-1.3b", "/m", "FluxPipeline", DEV_CONFIG)
    assert caught.value.field == "preset"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is a folder: give a .toml file"),
        (b"[sampling]\n# \xff\xfe\n", "is not UTF-8 text"),
    ],
)
def test_a_preset_file_that_is_no_text_file_is_named(tmp_path, content, message):
    path = tmp_path / "mine.toml"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(UserError, match=f"preset {path} {message}"):
        load_preset(str(path))


def test_a_schedule_value_of_the_wrong_kind_is_refused_though_the_checkpoint_wins(tiny_flux_dev, tmp_path):
    from sgdiff.config import RuntimeConfig
    from sgdiff.engine.runner import ModelRunner

    path = tmp_path / "mine.toml"
    path.write_text('[schedule]\nshift = "abc"\n')
    with pytest.raises(UserError, match="preset mine: \\[schedule\\] scheduler option shift must be float, got 'abc'"):
        ModelRunner(str(tiny_flux_dev), preset=str(path), runtime=RuntimeConfig(device="cpu"))
