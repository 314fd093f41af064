"""Qwen-Image's transformer with its norms marked for sgdiff's Triton kernels (--enable-fused-norms),
run on the CPU in Triton's interpreter: `TRITON_INTERPRET=1 python -m sgdiff.testing.qwen_kernel_checks`
(tests/test_qwen_image_speed.py). Its q/k norms are diffusers' RMSNorm (two roundings in bf16), its
adaLN is the blocks' Modulation (diffusers' img_mod / txt_mod) and the output's AdaModulation: in bf16
the plain model gives diffusers' output bit for bit, and the fused model the plain one's. Each check
raises on a mismatch and prints one line when it holds."""

from __future__ import annotations

import os

import torch

from sgdiff.models.qwen_image import QwenImageTransformer, QwenImageTransformerConfig
from sgdiff.testing.compare import randomize_weights
from sgdiff.testing.kernel_checks import check_model
from sgdiff.testing.qwen_parallel import TINY_EDIT, edit_inputs

BF16 = torch.bfloat16


def check_qwen_image(zero_cond_t: bool) -> None:
    from diffusers import QwenImageTransformer2DModel

    fields = {**TINY_EDIT, "zero_cond_t": zero_cond_t}
    reference = randomize_weights(QwenImageTransformer2DModel(**fields), seed=1).to(BF16)
    model = QwenImageTransformer(QwenImageTransformerConfig(**fields))
    model.load_state_dict(reference.state_dict())
    model = model.to(BF16).eval()
    # an Edit-style input, batch 2: the noise tokens' grid, then two input images'
    inputs = {k: v.to(BF16) if k != "img_shapes" else v for k, v in edit_inputs(2, [(1, 3, 4), (1, 2, 3)], 5).items()}
    name = "Qwen-Image" + (" zero_cond_t" if zero_cond_t else "")
    with torch.no_grad():
        plain, expected = model(**inputs), reference(**inputs, return_dict=False)[0]
    if not torch.equal(plain, expected):
        raise AssertionError(f"{name} differs from diffusers: {(plain - expected).abs().max():.3g}")
    modulations = 4 * model.config.num_layers + 1  # the image's and the text's two per block, the output's
    check_model(name, model, inputs, modulations)  # the fused model's output is the plain one


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the kernels then run on the CPU)")
    for zero_cond_t in (False, True):
        check_qwen_image(zero_cond_t)


if __name__ == "__main__":
    main()
