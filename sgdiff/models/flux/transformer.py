"""FLUX.1 MMDiT: 19 double-stream blocks (text and image streams with their own
weights, joint attention) then 38 single-stream blocks (one fused stream).

Math only. Parameter names match diffusers' FluxTransformer2DModel.
"""

from __future__ import annotations

import torch
from torch import nn

from sgdiff.models.attention import joint_attention
from sgdiff.models.flux.config import FluxTransformerConfig
from sgdiff.models.layers import (
    AdaModulation,
    FeedForward,
    Linear,
    MLPEmbedder,
    RMSNorm,
    gelu_projection,
    linear_over_concat,
    timestep_embedding,
)
from sgdiff.models.rope import rope_frequencies
from sgdiff.models.streams import Stream

Rope = torch.Tensor  # [S_txt + S_img, head_dim / 2, 2] (cos, sin) of the rotations


def clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """In fp16, keep activations finite as the reference does (FLUX's text stream overflows otherwise)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class QKNormedProjection(nn.Module):
    """Project to q, k, v with per-head RMSNorm on q and k (to_q/to_k/to_v, norm_q/norm_k)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads = dim // head_dim
        self.to_q = Linear(dim, dim)
        self.to_k = Linear(dim, dim)
        self.to_v = Linear(dim, dim)
        self.norm_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_k = RMSNorm(head_dim, eps=1e-6)


class JointAttention(QKNormedProjection):
    """Attention over [text; image] where each stream has its own projections."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__(dim, head_dim)
        self.add_q_proj = Linear(dim, dim)
        self.add_k_proj = Linear(dim, dim)
        self.add_v_proj = Linear(dim, dim)
        self.norm_added_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_added_k = RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([Linear(dim, dim)])
        self.to_add_out = Linear(dim, dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        # joint sequence, text first: [B, S_txt + S_img, H, D]
        streams = [
            Stream(txt, (self.add_q_proj, self.add_k_proj, self.add_v_proj), (self.norm_added_q, self.norm_added_k)),
            Stream(img, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k)),
        ]
        out = joint_attention(streams, rope, self.heads)[0].flatten(2)  # [B, S, H*D]
        txt_len = txt.shape[1]
        # contiguous halves: the projections then run the same GEMM (and rounding) as the reference at any batch
        img_out, txt_out = out[:, txt_len:].contiguous(), out[:, :txt_len].contiguous()
        return self.to_out[0](img_out), self.to_add_out(txt_out)


class DoubleStreamBlock(nn.Module):
    """diffusers' FluxTransformerBlock."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaModulation(dim, 6)
        self.norm1_context = AdaModulation(dim, 6)
        self.attn = JointAttention(dim, head_dim)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope: Rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(temb)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        h_img, h_txt = self.norm1.modulate(img, shift1, scale1), self.norm1_context.modulate(txt, c_shift1, c_scale1)
        img_attn, txt_attn = self.attn(h_img, h_txt, rope)
        img = img + gate1 * img_attn
        img = img + gate2 * self.ff(self.norm1.modulate(img, shift2, scale2))
        txt = txt + c_gate1 * txt_attn
        txt = txt + c_gate2 * self.ff_context(self.norm1_context.modulate(txt, c_shift2, c_scale2))
        return img, clip_fp16(txt)


class SingleStreamBlock(nn.Module):
    """diffusers' FluxSingleTransformerBlock: attention and MLP in parallel on one stream."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm = AdaModulation(dim, 3)
        self.attn = QKNormedProjection(dim, head_dim)
        self.proj_mlp = Linear(dim, dim * mlp_ratio)
        self.proj_out = Linear(dim + dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope: Rope) -> torch.Tensor:
        shift, scale, gate = self.norm(temb)
        h = self.norm.modulate(x, shift, scale)
        a = self.attn
        stream = Stream(h, (a.to_q, a.to_k, a.to_v), (a.norm_q, a.norm_k))
        # the MLP does not need the attention: under Ulysses it runs while the inputs or q, k and v travel
        attn_out, mlp_out = joint_attention([stream], rope, a.heads, lambda: gelu_projection(h, self.proj_mlp))
        attn_out = attn_out.flatten(2)  # [B, S, H, D] -> [B, S, H*D]
        # with the GELU in proj_mlp's epilogue, proj_out reads its output where it is (no concatenation)
        split = self.proj_mlp.gelu_epilogue
        return clip_fp16(x + gate * linear_over_concat(self.proj_out, [attn_out, mlp_out], split))


class TimeTextEmbedding(nn.Module):
    """Conditioning vector [B, D] from timestep, optional embedded guidance and pooled CLIP text."""

    def __init__(self, dim: int, pooled_dim: int, guidance_embeds: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance_embeds else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this FLUX transformer embeds guidance: pass `guidance`")
            emb = emb + self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class FluxTransformer(nn.Module):
    """FLUX.1 transformer over packed latents (2x2 patches already folded into channels)."""

    def __init__(self, config: FluxTransformerConfig):
        super().__init__()
        if sum(config.axes_dims_rope) != config.attention_head_dim:
            raise ValueError("axes_dims_rope must add up to attention_head_dim")
        self.config = config
        dim, head_dim = config.inner_dim, config.attention_head_dim
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = Linear(config.joint_attention_dim, dim)
        self.x_embedder = Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(dim, head_dim) for _ in range(config.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(dim, head_dim) for _ in range(config.num_single_layers)
        )
        self.norm_out = AdaModulation(dim, 2)
        out_features = config.patch_size**2 * config.output_channels
        self.proj_out = Linear(dim, out_features)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, S_img, C_in] packed latents; encoder_hidden_states: [B, S_txt, C_txt];
        pooled_projections: [B, C_pool]; timestep, guidance: [B], in units of 1/1000 (sigma);
        img_ids: [S_img, 3], txt_ids: [S_txt, 3]. Returns [B, S_img, C_out]."""
        img = self.x_embedder(hidden_states)
        timestep = timestep.to(img.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(img.dtype) * 1000
        temb = self.time_text_embed(timestep, guidance, pooled_projections)
        txt = self.context_embedder(encoder_hidden_states)
        rope = rope_frequencies(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope, theta=10000.0)

        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, rope)
        txt_len = txt.shape[1]
        x = torch.cat([txt, img], dim=1)  # one stream: [B, S_txt + S_img, D]
        for block in self.single_transformer_blocks:
            x = block(x, temb, rope)
        img = x[:, txt_len:]

        scale, shift = self.norm_out(temb)
        return self.proj_out(self.norm_out.modulate(img, shift, scale))
