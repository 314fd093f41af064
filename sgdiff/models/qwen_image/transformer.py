"""Qwen-Image MMDiT (diffusers' QwenImageTransformer2DModel): double-stream blocks only (text and
image streams with their own weights, joint attention over [text; image]), adaLN from the timestep.

Math only. Parameter names match diffusers. The Edit pipelines append their input images' tokens
after the noise tokens (img_shapes lists the grids in that order); the output covers every image
token and the caller keeps the noise tokens' part. What a block gets per token (the image tokens,
the rotary table, zero_cond_t's choice of conditioning) comes as tensors along the sequence, so a
shard plan (families/qwen_image/shard.py) can split them alike.

Text padding: diffusers' pipelines cut each prompt's embeddings to its own tokens and pad a batch to
its longest prompt; the mask they pass is None whenever no row is padded (one prompt, its CFG
negative in a forward of its own, num_images_per_prompt copies). Only a batch of prompts of unequal
lengths is masked, and the mask does change the outputs there (a padded token is txt_in's bias, not
zero). The attention entry point takes no mask, so this model refuses one that masks anything: run
such prompts one per forward, each cut to its tokens, which gives the masked result (the mask only
removes the padded keys; text positions do not depend on the padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sgdiff.models.flux.transformer import JointAttention, clip_fp16
from sgdiff.models.layers import AdaModulation, FeedForward, LayerNormModulation, Linear, MLPEmbedder, RMSNorm
from sgdiff.models.qwen_image.config import QwenImageTransformerConfig
from sgdiff.models.qwen_image.rope import Grid, image_grids, position_ids, rope_table


def sigma_embedding(sigma: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of sigma [B] -> [B, dim] (float32, cosine half first): layers.timestep_embedding
    of 1000 * sigma, rounded as diffusers' Qwen time projection rounds it (angles (sigma * freq) * 1000)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    angles = sigma[:, None].float() * torch.exp(exponent)[None, :] * 1000
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class DiffusersRMSNorm(RMSNorm):
    """RMSNorm rounded as diffusers' own RMSNorm rounds it (Qwen-Image's q/k norms and txt_norm): in
    bf16/fp16 the normalised x is cast to the weight's dtype before the weight scales it (torch's
    RMSNorm, FLUX's and Wan's, rounds once). The same numbers in float32. The fused q/k norm + RoPE
    kernel (--enable-fused-norms) rounds there too (`round_normed`)."""

    round_normed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        normed = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # float32
        return normed.to(self.weight.dtype) * self.weight


class QwenJointAttention(JointAttention):
    """FLUX's joint attention over [text; image] (the same parameters), with diffusers' RMSNorm rounding."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__(dim, head_dim)
        self.norm_q, self.norm_k = DiffusersRMSNorm(head_dim, eps=1e-6), DiffusersRMSNorm(head_dim, eps=1e-6)
        self.norm_added_q = DiffusersRMSNorm(head_dim, eps=1e-6)
        self.norm_added_k = DiffusersRMSNorm(head_dim, eps=1e-6)


class TimestepProjection(nn.Module):
    """diffusers' QwenTimestepProjEmbeddings: sigma [B] -> conditioning [B, D]."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(sigma_embedding(sigma).to(dtype))


class Modulation(nn.Sequential, LayerNormModulation):
    """SiLU -> Linear(D, 6D): shift, scale and gate of the attention, then of the MLP. Stored as
    `img_mod.1` / `txt_mod.1`, as diffusers names them; its `modulate` (the block's LayerNorm, which has
    no weights, and the modulation) is one Triton kernel with --enable-fused-norms."""

    def __init__(self, dim: int):
        super().__init__(nn.SiLU(), Linear(dim, 6 * dim))


class QwenImageBlock(nn.Module):
    """diffusers' QwenImageTransformerBlock (its LayerNorms have no weights: `modulate` is them)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.img_mod = Modulation(dim)
        self.attn = QwenJointAttention(dim, head_dim)
        self.img_mlp = FeedForward(dim)
        self.txt_mod = Modulation(dim)
        self.txt_mlp = FeedForward(dim)

    def image_modulation(self, temb: torch.Tensor, edit_tokens: torch.Tensor | None) -> torch.Tensor:
        """[B, 1, 6D]; with zero_cond_t (temb [2B, D]: the timestep's, then t = 0's; edit_tokens [S_img, 1],
        True at the edit images' tokens) [B, S_img, 6D]: the noise tokens modulated by the timestep, the
        edit images' tokens as at t = 0."""
        params = self.img_mod(temb)[:, None]  # [B or 2B, 1, 6D]
        if edit_tokens is None:
            return params
        own, zero = params.chunk(2)  # [B, 1, 6D] each
        return torch.where(edit_tokens, zero, own)  # [S_img, 1] with [B, 1, 6D] -> [B, S_img, 6D]

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb: torch.Tensor,
        rope: torch.Tensor,
        edit_tokens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img: [B, S_img, D]; txt: [B, S_txt, D]; temb: [B, D] ([2B, D] with zero_cond_t); rope:
        [S_txt + S_img, head_dim / 2, 2]; edit_tokens: [S_img, 1] bool or None (image_modulation)."""
        img_params = self.image_modulation(temb, edit_tokens)
        txt_params = self.txt_mod(temb[: txt.shape[0]])[:, None]  # [B, 1, 6D]
        shift1, scale1, gate1, shift2, scale2, gate2 = img_params.chunk(6, dim=-1)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = txt_params.chunk(6, dim=-1)
        h_img, h_txt = self.img_mod.modulate(img, shift1, scale1), self.txt_mod.modulate(txt, c_shift1, c_scale1)
        img_attn, txt_attn = self.attn(h_img, h_txt, rope)
        img = img + gate1 * img_attn
        txt = txt + c_gate1 * txt_attn
        img = img + gate2 * self.img_mlp(self.img_mod.modulate(img, shift2, scale2))
        txt = txt + c_gate2 * self.txt_mlp(self.txt_mod.modulate(txt, c_shift2, c_scale2))
        return clip_fp16(img), clip_fp16(txt)


class QwenImageTransformer(nn.Module):
    """Qwen-Image transformer over packed latents (2x2 patches already folded into channels)."""

    def __init__(self, config: QwenImageTransformerConfig):
        super().__init__()
        if sum(config.axes_dims_rope) != config.attention_head_dim or len(config.axes_dims_rope) != 3:
            raise ValueError("axes_dims_rope must be 3 sizes that add up to attention_head_dim")
        if config.use_additional_t_cond or config.use_layer3d_rope:
            raise ValueError(
                "Qwen-Image-Layered's transformer (use_additional_t_cond, use_layer3d_rope) is not supported"
            )
        self.config = config
        dim = config.inner_dim
        self.time_text_embed = TimestepProjection(dim)
        self.txt_norm = DiffusersRMSNorm(config.joint_attention_dim, eps=1e-6)
        self.img_in = Linear(config.in_channels, dim)
        self.txt_in = Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageBlock(dim, config.attention_head_dim) for _ in range(config.num_layers)
        )
        self.norm_out = AdaModulation(dim, 2)
        self.proj_out = Linear(dim, config.patch_size**2 * config.output_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_shapes: Sequence[Sequence[Grid]],
        encoder_hidden_states_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, S_img, C_in] packed latents (noise tokens, then any edit images'); encoder_hidden_states:
        [B, S_txt, D_txt]; timestep: [B] sigma (t / 1000); img_shapes: per batch item, the (frames, rows, cols) grid
        of each image whose tokens hidden_states joins, in order; encoder_hidden_states_mask: [B, S_txt], all ones
        or None (see the module's docstring). Returns [B, S_img, p*p*C_out]."""
        if guidance is not None:
            raise ValueError("the Qwen-Image transformer embeds no guidance: pass guidance=None")
        if encoder_hidden_states_mask is not None and not bool(encoder_hidden_states_mask.all()):
            raise ValueError(
                "a text mask with padding is not supported: run prompts of unequal lengths one per forward, "
                "each cut to its own tokens (the same result)"
            )
        batch, image_tokens, _ = hidden_states.shape
        grids = image_grids(img_shapes, batch, image_tokens)
        img = self.img_in(hidden_states)
        sigma = timestep.to(img.dtype)
        edit_tokens = None
        if self.config.zero_cond_t:  # a second conditioning, at t = 0, for the edit images' tokens
            sigma = torch.cat([sigma, sigma * 0])
            edit_tokens = (torch.arange(image_tokens, device=img.device) >= math.prod(grids[0]))[:, None]  # [S_img, 1]
        temb = self.time_text_embed(sigma, img.dtype)  # [B, D], or [2B, D] with zero_cond_t
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        ids = position_ids(grids, txt.shape[1], img.device)  # [S_txt + S_img, 3]
        rope = rope_table(ids, self.config.axes_dims_rope)  # [S_txt + S_img, head_dim / 2, 2]

        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, rope, edit_tokens)

        scale, shift = self.norm_out(temb[:batch])
        return self.proj_out(self.norm_out.modulate(img, shift, scale))
