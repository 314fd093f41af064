"""sgdiff's text encoders (models/text/) against transformers' CLIPTextModel, T5EncoderModel and
UMT5EncoderModel on the same weights: outputs (fp32, CPU, with and without padding masks), which parameters
each dtype keeps in float32, the checkpoint layouts they load, the checkpoints and configs they refuse, and
that a FLUX request imports none of transformers' modeling code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel, UMT5Config, UMT5EncoderModel

from sgdiff.errors import UserError
from sgdiff.pipeline.components import build_tokenizer, load_tokenizer
from sgdiff.pipeline.text_encoders import load_clip_text_encoder, load_t5_encoder
from sgdiff.testing.compare import max_relative_error, randomize_weights
from sgdiff.testing.tiny_configs import WAN_UMT5
from sgdiff.testing.tiny_flux import (
    make_clip_text_encoder,
    make_clip_tokenizer,
    make_t5_text_encoder,
    make_t5_tokenizer,
)

TOLERANCE = 1e-5  # max |ours - reference| / max |reference|, fp32
LOW_PRECISION_TOLERANCE = 1e-3  # bf16 / fp16 (on this CPU they come out bit-identical)
CPU = torch.device("cpu")
PROMPTS = ["a photo of the red cube on an old table", "the"]
T5_LENGTH = 16  # FLUX pads T5 to 256/512; a short max length keeps the test small


EMBEDDINGS = ("embedding", "shared", "relative_attention_bias")  # of order one, like the trained models'


def clip_reference(seed: int, **config) -> CLIPTextModel:
    model = make_clip_text_encoder(make_clip_tokenizer(), seed)
    for key, value in config.items():
        setattr(model.config, key, value)
    if config:  # rebuilt from the changed config
        model = CLIPTextModel(model.config)
    return randomize_weights(model, seed, EMBEDDINGS)


def t5_reference(kind: str, seed: int) -> torch.nn.Module:
    tokenizer = make_t5_tokenizer()
    if kind == "umt5":
        config = UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **WAN_UMT5)
        return randomize_weights(UMT5EncoderModel(config), seed, EMBEDDINGS)
    model = make_t5_text_encoder(tokenizer, seed)
    if kind == "t5-relu":  # the original T5's plain feed-forward
        model.config.feed_forward_proj, model.config.dense_act_fn, model.config.is_gated_act = "relu", "relu", False
        model = T5EncoderModel(model.config)
    return randomize_weights(model, seed, EMBEDDINGS)


def saved(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def clip_inputs(**kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's CLIP input: batch 2 padded to 77 tokens, and the padding mask."""
    tokens = make_clip_tokenizer()(PROMPTS, padding="max_length", max_length=77, return_tensors="pt", **kwargs)
    return tokens.input_ids, tokens.attention_mask


def t5_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = make_t5_tokenizer()(PROMPTS, padding="max_length", max_length=T5_LENGTH, truncation=True,
                                 return_tensors="pt")  # fmt: skip
    return tokens.input_ids, tokens.attention_mask


def outputs(model, ids: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(ids, mask)
    return [t for t in (out.last_hidden_state, getattr(out, "pooler_output", None)) if t is not None]


def assert_parity(ours, reference, ids: torch.Tensor, mask: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    """Ours == transformers' within `tolerance` with the padding mask and without it (as FLUX calls them),
    and a one-token change moves every output far beyond the fp32 tolerance. Returns the largest error."""
    worst = 0.0
    for m in (mask, None):
        expected, actual = outputs(reference, ids, m), outputs(ours, ids, m)
        assert len(actual) == len(expected) and all(a.dtype == e.dtype for a, e in zip(actual, expected, strict=True))
        errors = [max_relative_error(a, e) for a, e in zip(actual, expected, strict=True)]
        assert max(errors) <= tolerance, errors
        worst = max(worst, *errors)
    changed = ids.clone()
    changed[:, 1] = (changed[:, 1] + 1) % 60  # the second token of each prompt (the first is CLIP's start token)
    for moved, expected in zip(outputs(ours, changed, mask), outputs(reference, ids, mask), strict=True):
        assert max_relative_error(moved, expected) > 1000 * TOLERANCE
    return worst


@pytest.mark.parametrize(
    "config",
    [{}, {"hidden_act": "gelu"}, {"eos_token_id": 2}],
    ids=["flux-clip", "gelu", "legacy-eos-2"],
)
def test_clip_matches_transformers(config, tmp_path):
    reference = clip_reference(seed=len(config), **config)
    ours = load_clip_text_encoder(saved(reference, tmp_path), torch.float32, CPU)
    ids, mask = clip_inputs()
    if config.get("eos_token_id") == 2:  # pooled at the largest id: random ids put it anywhere
        ids = torch.randint(0, reference.config.vocab_size, ids.shape, generator=torch.Generator().manual_seed(0))
    assert_parity(ours, reference, ids, mask)


def test_clip_pools_at_the_first_end_of_text_token(tmp_path):
    """The tokenizer pads with the end-of-text token: the pooled state is the first one's, after the prompt."""
    ours = load_clip_text_encoder(saved(clip_reference(seed=3), tmp_path), torch.float32, CPU)
    ids, _ = clip_inputs()
    first_eos = [row.tolist().index(ours.config.eos_token_id) for row in ids]
    assert first_eos[0] > first_eos[1] > 1 and ids[0, -1] == ours.config.eos_token_id
    out = ours(ids)
    assert torch.equal(out.pooler_output, out.last_hidden_state[[0, 1], first_eos])


@pytest.mark.parametrize("kind", ["t5", "t5-relu", "umt5"])
def test_t5_matches_transformers(kind, tmp_path):
    reference = t5_reference(kind, seed=len(kind))
    ours = load_t5_encoder(saved(reference, tmp_path), torch.float32, CPU)
    assert_parity(ours, reference, *t5_inputs())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["clip", "t5", "umt5"])
def test_low_precision_layout_and_outputs_match_from_pretrained(kind, dtype, tmp_path):
    """The parameters each dtype keeps in float32 (T5's `wo` at float16 only), and the outputs, as
    transformers' from_pretrained(dtype=...) gives them."""
    if kind == "clip":
        folder, load, inputs = saved(clip_reference(seed=4), tmp_path), load_clip_text_encoder, clip_inputs()
        reference = CLIPTextModel.from_pretrained(folder, dtype=dtype)
    else:
        folder, load, inputs = saved(t5_reference(kind, seed=5), tmp_path), load_t5_encoder, t5_inputs()
        reference = (UMT5EncoderModel if kind == "umt5" else T5EncoderModel).from_pretrained(folder, dtype=dtype)
    ours = load(folder, dtype, CPU)
    layout = {name.removeprefix("text_model."): p.dtype for name, p in ours.named_parameters()}
    assert layout == {name: p.dtype for name, p in reference.named_parameters()}
    kept = sorted(name for name, d in layout.items() if d == torch.float32)
    assert kept == (sorted(n for n in layout if n.endswith(".wo.weight")) if dtype == torch.float16 and kind != "clip"
                    else [])  # fmt: skip
    assert_parity(ours, reference.eval(), *inputs, tolerance=LOW_PRECISION_TOLERANCE)


def test_clip_loads_the_transformers_4_layout(tmp_path):
    """FLUX.1's text_encoder/ holds `text_model.`-prefixed names (and old files a position_ids buffer)."""
    reference = clip_reference(seed=6)
    folder = saved(reference, tmp_path)
    state = {f"text_model.{name}": tensor for name, tensor in load_file(folder / "model.safetensors").items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, folder / "model.safetensors")
    assert_parity(load_clip_text_encoder(folder, torch.float32, CPU), reference, *clip_inputs())


def test_t5_ignores_the_tied_embedding_copy(tmp_path):
    reference = t5_reference("t5", seed=7)
    folder = saved(reference, tmp_path)
    state = load_file(folder / "model.safetensors")
    assert "encoder.embed_tokens.weight" not in state  # transformers 5 leaves the tied copy out
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()  # older files hold it
    save_file(state, folder / "model.safetensors")
    assert_parity(load_t5_encoder(folder, torch.float32, CPU), reference, *t5_inputs())


def test_t5_takes_the_embedding_from_the_encoders_copy_when_the_file_has_only_that(tmp_path):
    reference = t5_reference("t5", seed=7)
    folder = saved(reference, tmp_path)
    state = load_file(folder / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    save_file(state, folder / "model.safetensors")
    assert_parity(load_t5_encoder(folder, torch.float32, CPU), reference, *t5_inputs())


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message and all(part in message for part in parts), message


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_a_checkpoint_missing_a_tensor_is_refused(kind, tmp_path):
    folder = saved(clip_reference(seed=8) if kind == "clip" else t5_reference("t5", seed=8), tmp_path)
    state = load_file(folder / "model.safetensors")
    dropped = "final_layer_norm.weight" if kind == "clip" else "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    del state[dropped]
    save_file(state, folder / "model.safetensors")
    load = load_clip_text_encoder if kind == "clip" else load_t5_encoder
    with pytest.raises(UserError) as error:
        load(folder, torch.float32, CPU)
    assert_one_line(error, str(folder), "weights do not match", "missing", dropped)


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("clip", {"hidden_act": "gelu_10"}, "hidden_act 'gelu_10' is not supported"),
        ("clip", {"eos_token_id": [2, 3]}, "eos_token_id (2, 3) is not supported"),
        ("clip", {"model_type": "clip"}, "model_type 'clip' is not a CLIP text model"),
        ("clip", {"num_attention_heads": 5}, "hidden_size 32 is not a multiple of num_attention_heads 5"),
        ("t5", {"feed_forward_proj": "gated-tanh", "dense_act_fn": "tanh"}, "dense_act_fn 'tanh' is not supported"),
        ("t5", {"feed_forward_proj": "double-gelu"}, "feed_forward_proj 'double-gelu' is not"),
        ("t5", {"is_decoder": True}, "is_decoder is true"),
        ("t5", {"model_type": "mt5"}, "model_type 'mt5' is not a T5 encoder"),
        ("t5", {"relative_attention_num_buckets": 2}, "relative_attention_num_buckets 2 is < 4"),
    ],
)
def test_an_unsupported_config_is_refused_in_one_line(kind, change, message, tmp_path):
    folder = saved(clip_reference(seed=9) if kind == "clip" else t5_reference("t5", seed=9), tmp_path)
    config_path = folder / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    load = load_clip_text_encoder if kind == "clip" else load_t5_encoder
    with pytest.raises(UserError) as error:
        load(folder, torch.float32, CPU)
    assert_one_line(error, str(config_path), message)


@pytest.mark.parametrize("folder", ["tokenizer", "tokenizer_2"])
def test_the_tokenizer_loaded_alone_is_autotokenizers(tiny_flux_dev, folder):
    """Built by transformers, it is AutoTokenizer's class; loaded (built, or from sgdiff's cache when an
    earlier test built it), it encodes as AutoTokenizer's does."""
    built, auto = build_tokenizer(tiny_flux_dev / folder), AutoTokenizer.from_pretrained(tiny_flux_dev / folder)
    assert type(built) is type(auto)
    kwargs = dict(padding="max_length", max_length=min(auto.model_max_length, 32), truncation=True)
    for alone in (built, load_tokenizer(tiny_flux_dev / folder)):
        assert alone(PROMPTS, **kwargs).input_ids == auto(PROMPTS, **kwargs).input_ids


IMPORTS = """
import json, sys
from sgdiff.cli.main import app
sys.argv = ["sgdiff", "generate", "--prompt", "a red circle", "--steps", "1", "-q", "--output-path", sys.argv[1]]
try:
    app()
except SystemExit as exit:
    assert not exit.code, exit.code
print(json.dumps(sorted(sys.modules)))
"""
NOT_IMPORTED = ["torch._dynamo", "transformers.modeling_utils", "transformers.masking_utils", "transformers.generation",
                "transformers.models.auto.modeling_auto", "transformers.models.clip.modeling_clip",
                "transformers.models.t5.modeling_t5", "diffusers"]  # fmt: skip


def test_a_flux_request_imports_no_transformers_model_code(tmp_path):
    """The demo image model (FLUX): sgdiff's encoders, the tokenizers' own classes, nothing compiled; and
    once the tokenizers are in sgdiff's cache (pipeline/tokenizers.py), no transformers at all."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    imported = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", IMPORTS, str(tmp_path)], capture_output=True, text=True,
                              timeout=300, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        imported.append(set(json.loads(done.stdout.strip().splitlines()[-1])))
    first, second = imported
    assert "sgdiff.models.text.t5" in first and "transformers.models.clip.tokenization_clip" in first
    assert sorted(first & set(NOT_IMPORTED)) == []
    assert "sgdiff.models.text.t5" in second and not any(m.split(".")[0] == "transformers" for m in second)
