"""What the real diffusers repos' non-weight files say, for the checkpoints sgdiff writes itself (the
tiny test pipelines of sgdiff/testing/, the demo models of sgdiff/demo/): scheduler configs and the
class names model_index.json records. Plain data: loading a checkpoint reads its own files instead."""

from __future__ import annotations

from typing import Any

# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell.
FLUX_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "dev": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    },
    "schnell": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
    },
}

# scheduler/scheduler_config.json of the Wan-AI diffusers repos (UniPC in flow mode) without flow_shift,
# the one value that differs: 3.0 (480p and A14B), 5.0 (TI2V-5B), as diffusers' convert_wan_to_diffusers.py.
WAN_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

# model_index.json names as in the Wan-AI repos; transformers 5 would record `T5Tokenizer` (T5TokenizerFast is
# now an alias of it) and, without torchvision, `CLIPImageProcessorPil`. Both names load the same objects.
WAN_CLASS_NAMES: dict[str, tuple[str, str]] = {
    "tokenizer": ("transformers", "T5TokenizerFast"),
    "image_processor": ("transformers", "CLIPImageProcessor"),
}
