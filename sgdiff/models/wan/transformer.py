"""Wan 2.1 / 2.2 video DiT: patchify with a 3D conv, blocks of self-attention (3-axis rotary),
cross-attention to the text (and, for I2V, to CLIP image features), MLP; adaLN from the timestep.

Math only. Parameter names match diffusers' WanTransformer3DModel. Like diffusers, the
modulation tables, time embedder and norms stay in float32 (KEEP_FP32) whatever the model dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sgdiff.models.attention import attention
from sgdiff.models.layers import (
    FeedForward,
    FP32LayerNorm,
    GatedResidual,
    Linear,
    MLPEmbedder,
    RMSNorm,
    project,
    timestep_embedding,
)
from sgdiff.models.rope import norm_and_rope, rope_frequencies
from sgdiff.models.wan.config import WanTransformerConfig

# Parameter-name components kept in float32 when the model runs in bf16/fp16 (as diffusers loads them).
KEEP_FP32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
# Checkpoint tensors that some Wan checkpoints carry and no computation uses.
IGNORED_KEYS = ("norm_added_q",)


def video_position_ids(frames: int, rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """[frames*rows*cols, 3] (frame, row, col) ids in the order the patchified tokens come. Made on
    `device` (no host-to-device copy inside a forward: CUDA graph capture forbids one)."""
    axes = (torch.arange(n, device=device) for n in (frames, rows, cols))
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


class WanAttention(nn.Module):
    """to_q/to_k/to_v with RMSNorm over all heads on q and k; optional image key/value branch."""

    def __init__(self, dim: int, heads: int, eps: float, image_kv: bool = False):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim)
        self.to_k = Linear(dim, dim)
        self.to_v = Linear(dim, dim)
        self.to_out = nn.ModuleList([Linear(dim, dim)])
        self.norm_q = RMSNorm(dim, eps=eps)
        self.norm_k = RMSNorm(dim, eps=eps)
        if image_kv:
            self.add_k_proj = Linear(dim, dim)
            self.add_v_proj = Linear(dim, dim)
            self.norm_added_k = RMSNorm(dim, eps=eps)

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.heads, -1))  # [B, S, H*D] -> [B, S, H, D]

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: torch.Tensor | None = None,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if context is None:  # self-attention
            q, k, v = project(x, self.to_q, self.to_k, self.to_v)
        else:
            q, (k, v) = self.to_q(x), project(context, self.to_k, self.to_v)
        if rope is not None:
            q = norm_and_rope([(q, self.norm_q)], rope, self.heads)  # [B, S, H*D] -> [B, S, H, D]
            k = norm_and_rope([(k, self.norm_k)], rope, self.heads)
        else:
            q, k = self.heads_of(self.norm_q(q)), self.heads_of(self.norm_k(k))
        v = self.heads_of(v)
        out = attention(q, k, v).flatten(2).type_as(q)  # [B, S, H*D]
        if image_context is not None:
            k_img = self.heads_of(self.norm_added_k(self.add_k_proj(image_context)))
            v_img = self.heads_of(self.add_v_proj(image_context))
            out = out + attention(q, k_img, v_img).flatten(2).type_as(q)
        return self.to_out[0](out)


class WanBlock(nn.Module):
    """diffusers' WanTransformerBlock."""

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        dim, heads, eps = config.inner_dim, config.num_attention_heads, config.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, eps)
        self.attn2 = WanAttention(dim, heads, eps, image_kv=config.added_kv_proj_dim is not None)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, dim))
        self.residual = GatedResidual()  # (no parameters)

    def forward(self, x, context, image_context, modulation: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        # modulation: [B, 1 or S, 6, D] -> six [B, 1 or S, D] vectors, in float32
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + modulation.float()).unbind(2)
        h = self.norm1.modulate(x, shift, scale)
        x = self.residual(x, self.attn1(h, rope=rope), gate)
        h = self.norm2(x)  # (FP32LayerNorm: in float32, back in bf16)
        x = x + self.attn2(h, context, image_context=image_context)
        h = self.norm3.modulate(x, c_shift, c_scale)
        return self.residual(x, self.ffn(h), c_gate)


class WanImageEmbedding(nn.Module):
    """CLIP image features -> model width (I2V): LayerNorm, GELU MLP, LayerNorm."""

    def __init__(self, in_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_dim)
        self.ff = FeedForward(in_dim, in_dim, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.empty(1, pos_embed_seq_len, in_dim)) if pos_embed_seq_len else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            image = image.view(-1, 2 * image.shape[1], image.shape[2]) + self.pos_embed
        return self.norm2(self.ff(self.norm1(image)))


class WanConditionEmbedder(nn.Module):
    """Timestep -> (temb [.., D], per-block modulation [.., 6D]); text and image features -> width D."""

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        dim = config.inner_dim
        self.freq_dim = config.freq_dim
        self.time_embedder = MLPEmbedder(config.freq_dim, dim)
        self.time_proj = Linear(dim, 6 * dim)
        self.text_embedder = MLPEmbedder(config.text_dim, dim, activation="gelu_tanh")
        self.image_embedder = (
            WanImageEmbedding(config.image_dim, dim, config.pos_embed_seq_len) if config.image_dim else None
        )

    def forward(self, timestep: torch.Tensor, text: torch.Tensor):
        # timestep: [B] or [B, S] (Wan2.2 TI2V: one timestep per token)
        t_freq = timestep_embedding(timestep.flatten(), self.freq_dim).unflatten(0, timestep.shape)
        t_freq = t_freq.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(t_freq).type_as(text)
        return temb, self.time_proj(nn.functional.silu(temb)), self.text_embedder(text)


class WanTransformer(nn.Module):
    """Velocity prediction for video latents [B, C, F, H, W]."""

    # an expert of Wan2.2 A14B, which runs only its share of the steps (set by the loader): a whole run's
    # calibrated step statistics (MagCache's ratios) do not fit it
    shares_steps: bool = False

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.condition_embedder = WanConditionEmbedder(config)
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, dim))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, C, F, H, W]; timestep: [B] or [B, S] in 0..1000; encoder_hidden_states:
        [B, L, text_dim]; encoder_hidden_states_image: [B, L_img, image_dim] (I2V). Returns [B, C_out, F, H, W]."""
        b, _, f, h, w = hidden_states.shape
        pt, ph, pw = self.config.patch_size
        grid = (f // pt, h // ph, w // pw)
        rope = rope_frequencies(video_position_ids(*grid, hidden_states.device), self.config.rope_axes, 10000.0)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # [B, S, D]

        temb, modulation, context = self.condition_embedder(timestep, encoder_hidden_states)
        # modulation: [B, 6D] or [B, S, 6D] -> [B, 1 or S, 6, D]
        modulation = modulation.unflatten(-1, (6, -1))
        modulation = modulation[:, None] if modulation.ndim == 3 else modulation
        image_context = None
        if encoder_hidden_states_image is not None:  # (an I2V model's, which has an image_embedder)
            image_context = self.condition_embedder.image_embedder(encoder_hidden_states_image)  # type: ignore[misc]
        for block in self.blocks:
            x = block(x, context, image_context, modulation, rope)

        temb = temb[:, None] if temb.ndim == 2 else temb  # [B, 1 or S, D]
        shift, scale = (self.scale_shift_table[:, None] + temb[:, :, None]).unbind(2)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        # [B, S, pt*ph*pw*C] -> [B, C, F, H, W]
        x = x.reshape(b, *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
