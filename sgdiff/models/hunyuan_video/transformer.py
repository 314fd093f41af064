"""HunyuanVideo video DiT (diffusers' HunyuanVideoTransformer3DModel): the latents patchified by a 3D
conv, the Llama text refined by a small transformer of its own (refiner.py), then dual-stream blocks
(video and text streams with their own weights, joint attention) and single-stream blocks (one joined
stream), FLUX's blocks in all but the details below; adaLN from the timestep, the embedded guidance
(guidance-distilled checkpoints) and the pooled CLIP text.

Math only. Parameter names match diffusers. As in diffusers, the joint sequence is [video; text]
(FLUX's is [text; video]); only the video tokens are rotated (rope.py: the text's rows of the table are
the identity). q/k norms round as diffusers' RMSNorm does (DiffusersRMSNorm); the modulated LayerNorms
run in the input's dtype, as diffusers' do. What a block gets per token (its streams, the rotary
table) comes as tensors along the sequence, so a shard plan can split them alike; after the last
block the model keeps the first S_vid tokens of the single stream (a plan that gathers the video
tokens puts them first).

Text padding: diffusers' pipeline pads every Llama prompt to max_sequence_length and masks the padded
tokens, as keys in the refiner's and the blocks' attention, and in the refiner's mean. A padded token
never acts as anything but a masked key, or as a query whose output never reaches a video token, so
the prompt cut to its own tokens gives the masked result. The attention entry point takes no mask,
so this model refuses one that masks anything: pass each prompt cut to its tokens (a batch of prompts
of unequal lengths one per forward), with the mask None or all ones.
"""

from __future__ import annotations

import torch
from torch import nn

from sgdiff.models.attention import joint_attention
from sgdiff.models.flux.transformer import JointAttention, QKNormedProjection, TimeTextEmbedding
from sgdiff.models.hunyuan_video.config import HunyuanVideoTransformerConfig
from sgdiff.models.hunyuan_video.refiner import TokenRefiner
from sgdiff.models.hunyuan_video.rope import joint_rope, video_rope
from sgdiff.models.layers import AdaModulation, FeedForward, Linear, gelu_projection, linear_over_concat
from sgdiff.models.qwen_image.transformer import DiffusersRMSNorm
from sgdiff.models.streams import Stream

Rope = torch.Tensor  # [S_vid + S_txt, head_dim / 2, 2] (cos, sin); identity rows for the text


class HunyuanJointAttention(JointAttention):
    """FLUX's joint attention (the same parameters) over [video; text], with diffusers' RMSNorm rounding."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__(dim, head_dim)
        self.norm_q, self.norm_k = DiffusersRMSNorm(head_dim, eps=1e-6), DiffusersRMSNorm(head_dim, eps=1e-6)
        self.norm_added_q = DiffusersRMSNorm(head_dim, eps=1e-6)
        self.norm_added_k = DiffusersRMSNorm(head_dim, eps=1e-6)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        streams = [
            Stream(img, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k)),
            Stream(txt, (self.add_q_proj, self.add_k_proj, self.add_v_proj), (self.norm_added_q, self.norm_added_k)),
        ]
        out = joint_attention(streams, rope, self.heads)[0].flatten(2)  # [B, S_vid + S_txt, H, D] -> [.., H*D]
        img_len = img.shape[1]
        # the halves as views, as diffusers passes them: with B > 1 they are not contiguous, and torch's linear
        # then adds the bias after the GEMM (rounded twice in bf16), as it does in the reference
        return self.to_out[0](out[:, :img_len]), self.to_add_out(out[:, img_len:])


class DualStreamBlock(nn.Module):
    """diffusers' HunyuanVideoTransformerBlock (FLUX's double-stream block, [video; text] order)."""

    def __init__(self, dim: int, head_dim: int, mlp_dim: int):
        super().__init__()
        self.norm1 = AdaModulation(dim, 6)
        self.norm1_context = AdaModulation(dim, 6)
        self.attn = HunyuanJointAttention(dim, head_dim)
        self.ff = FeedForward(dim, mlp_dim)
        self.ff_context = FeedForward(dim, mlp_dim)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img: [B, S_vid, D]; txt: [B, S_txt, D]; temb: [B, D]; rope: [S_vid + S_txt, head_dim / 2, 2]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(temb)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        h_img, h_txt = self.norm1.modulate(img, shift1, scale1), self.norm1_context.modulate(txt, c_shift1, c_scale1)
        img_attn, txt_attn = self.attn(h_img, h_txt, rope)
        img = img + img_attn * gate1
        txt = txt + txt_attn * c_gate1
        img = img + gate2 * self.ff(self.norm1.modulate(img, shift2, scale2))
        txt = txt + c_gate2 * self.ff_context(self.norm1_context.modulate(txt, c_shift2, c_scale2))
        return img, txt


class PreOnlyAttention(QKNormedProjection):
    """The single-stream blocks' q/k/v projections (to_q/to_k/to_v, norm_q/norm_k), diffusers' RMSNorm
    rounding; no output projection of its own (proj_out of the block follows)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__(dim, head_dim)
        self.norm_q, self.norm_k = DiffusersRMSNorm(head_dim, eps=1e-6), DiffusersRMSNorm(head_dim, eps=1e-6)


class SingleStreamBlock(nn.Module):
    """diffusers' HunyuanVideoSingleTransformerBlock (FLUX's): attention and MLP in parallel on [video; text]."""

    def __init__(self, dim: int, head_dim: int, mlp_dim: int):
        super().__init__()
        self.norm = AdaModulation(dim, 3)
        self.attn = PreOnlyAttention(dim, head_dim)
        self.proj_mlp = Linear(dim, mlp_dim)
        self.proj_out = Linear(dim + mlp_dim, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x: [B, S_vid + S_txt, D]; temb: [B, D]; rope: [S_vid + S_txt, head_dim / 2, 2]."""
        shift, scale, gate = self.norm(temb)
        h = self.norm.modulate(x, shift, scale)
        a = self.attn
        stream = Stream(h, (a.to_q, a.to_k, a.to_v), (a.norm_q, a.norm_k))
        # the MLP does not need the attention: under Ulysses it runs while the inputs or q, k and v travel
        attn_out, mlp_out = joint_attention([stream], rope, a.heads, lambda: gelu_projection(h, self.proj_mlp))
        attn_out = attn_out.flatten(2)  # [B, S, H, D] -> [B, S, H*D]
        # with the GELU in proj_mlp's epilogue, proj_out reads its output where it is (no concatenation)
        split = self.proj_mlp.gelu_epilogue
        return x + gate * linear_over_concat(self.proj_out, [attn_out, mlp_out], split)


class PatchEmbed(nn.Module):
    """diffusers' HunyuanVideoPatchEmbed: a Conv3d over (pt, p, p) patches, stored as `proj`."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents).flatten(2).transpose(1, 2)  # [B, D, F', H', W'] -> [B, F'*H'*W', D]


class HunyuanVideoTransformer(nn.Module):
    """Velocity prediction for video latents [B, C, F, H, W]."""

    def __init__(self, config: HunyuanVideoTransformerConfig):
        super().__init__()
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        patch = (config.patch_size_t, config.patch_size, config.patch_size)
        self.x_embedder = PatchEmbed(config.in_channels, dim, patch)
        self.context_embedder = TokenRefiner(config.text_embed_dim, heads, head_dim, config.num_refiner_layers)
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(
            DualStreamBlock(dim, head_dim, config.mlp_dim) for _ in range(config.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(dim, head_dim, config.mlp_dim) for _ in range(config.num_single_layers)
        )
        self.norm_out = AdaModulation(dim, 2)
        self.proj_out = Linear(dim, config.patch_size_t * config.patch_size**2 * config.output_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, C_in, F, H, W] latents; timestep: [B] in 0..1000; encoder_hidden_states:
        [B, L, text_embed_dim], every token valid; pooled_projections: [B, pooled_projection_dim];
        guidance: [B] (guidance scale * 1000), needed when the config embeds guidance, else ignored (as
        diffusers does); encoder_attention_mask: [B, L], None or all ones (see the module's docstring).
        Returns [B, C_out, F, H, W]."""
        if encoder_attention_mask is not None and not bool(encoder_attention_mask.all()):
            raise ValueError(
                "a text mask with padding is not supported: pass each prompt cut to its own tokens, prompts of "
                "unequal lengths one per forward (the same result as diffusers' masked padding)"
            )
        if self.config.guidance_embeds and guidance is None:
            raise ValueError("this HunyuanVideo transformer embeds guidance: pass `guidance` (guidance scale * 1000)")
        c = self.config
        b, _, f, h, w = hidden_states.shape
        pt, p = c.patch_size_t, c.patch_size
        grid = (f // pt, h // p, w // p)

        temb = self.time_text_embed(timestep, guidance if c.guidance_embeds else None, pooled_projections)  # [B, D]
        img = self.x_embedder(hidden_states)  # [B, S_vid, D]
        txt = self.context_embedder(encoder_hidden_states, timestep)  # [B, S_txt, D]
        image_tokens = img.shape[1]
        rope = joint_rope(video_rope(grid, c.rope_axes_dim, c.rope_theta, img.device), txt.shape[1])

        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, rope)
        x = torch.cat([img, txt], dim=1)  # one stream: [B, S_vid + S_txt, D]
        for block in self.single_transformer_blocks:
            x = block(x, temb, rope)
        img = x[:, :image_tokens]

        scale, shift = self.norm_out(temb)
        out = self.proj_out(self.norm_out.modulate(img, shift, scale))  # [B, S_vid, C_out*pt*p*p]
        # [B, F', H', W', C, pt, p, p] -> [B, C, F', pt, H', p, W', p] -> [B, C, F, H, W]
        out = out.reshape(b, *grid, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)
