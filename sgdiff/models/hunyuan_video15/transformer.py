"""HunyuanVideo-1.5 video DiT (diffusers' HunyuanVideo15Transformer3DModel): the latents patchified by a
3D conv, a context of SigLIP image tokens (I2V), ByT5 glyph tokens and refined Qwen2.5-VL prompt tokens,
then double-stream blocks only (video and context streams with their own weights, joint attention, only the
video tokens rotated), adaLN from the timestep.

Math only. Parameter names match diffusers. Nothing is kept in float32 (diffusers keeps nothing either); the
refiner's mean text token is summed in float32, as diffusers' is.

Text padding. diffusers' pipelines pad the prompt's Qwen2.5-VL hidden states to 1000 tokens and the ByT5
glyph features to 256 (all padding when the prompt quotes no text) and pass both masks; T2V passes all-zero
image embeddings, which the transformer reads as "no image" (one torch.all(image_embeds == 0) over the
batch), I2V 729 SigLIP tokens, all valid. The transformer then (1) refines the prompt tokens with a
self-attention masked to the valid ones (query and key) and a mean over the valid ones, (2) joins each row's
context as [valid image, valid glyph, valid prompt tokens, then the invalid ones], and (3) masks every
double-stream attention, [video; context] with the video always valid, so that a token sees valid keys
only; a padded token's own row attends to nothing and is never read. No padded token reaches a video token
by any path, and a context token's place plays no role (no rotation, no position embedding): diffusers'
output is that of the valid tokens alone.

The attention entry point takes no mask, so this model computes exactly that: it cuts each row to its valid
tokens (the masks' ones, in order), joins them [image; glyph; prompt] as diffusers does, and attends over
[video; context] unmasked (the context with the identity rotation). Rows of unequal valid counts cannot share a
tensor: they run one forward per count (diffusers' guider already runs CFG's branches one per forward, and a
prompt's copies share counts). Cutting needs the masks' counts on the host (a sync). A caller that passes
each prompt's tokens already cut with the masks None (every token valid), and image_embeds=None for T2V,
gets the same result without any data-dependent step (nothing that stops a CUDA graph); image embeddings
given are checked for all zeros (one host read), diffusers' T2V convention. In bf16, a batch of several
padded rows rounds otherwise than diffusers' (its GEMMs run over the padded context); one row, or rows
without padding, give diffusers' numbers exactly on the CPU. Each context length is a shape of its own to
torch.compile and CUDA graphs, as Qwen-Image's prompt lengths are.
"""

from __future__ import annotations

import torch
from torch import nn

from sgdiff.models.attention import joint_attention
from sgdiff.models.hunyuan_video15.config import HunyuanVideo15TransformerConfig
from sgdiff.models.hunyuan_video15.embeddings import ByT5Projection, ImageProjection, PatchEmbed, TimeEmbedding
from sgdiff.models.hunyuan_video15.refiner import TokenRefiner
from sgdiff.models.hunyuan_video15.rope import joint_rope, video_rope
from sgdiff.models.hunyuan_video15.tokens import check_mask, row_groups, take, valid_tokens
from sgdiff.models.layers import AdaModulation, FeedForward, Linear
from sgdiff.models.qwen_image.transformer import QwenJointAttention
from sgdiff.models.streams import Stream

# cond_type_embed's rows: what kind of context token each is
PROMPT, GLYPH, IMAGE = 0, 1, 2


class VideoFirstAttention(QwenJointAttention):
    """Qwen-Image's joint attention (FLUX's parameters, diffusers' RMSNorm rounding) over [video; context], the
    order diffusers joins this model's streams in (the keys' order changes the rounding of bf16 outputs)."""

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        streams = [
            Stream(img, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k)),
            Stream(txt, (self.add_q_proj, self.add_k_proj, self.add_v_proj), (self.norm_added_q, self.norm_added_k)),
        ]
        out = joint_attention(streams, rope, self.heads)[0].flatten(2)  # [B, S_vid + S_ctx, H, D] -> [.., H*D]
        video = img.shape[1]
        # the two parts as views, as diffusers projects them: with B > 1 a view is not contiguous and torch's linear
        # then rounds otherwise in bf16 than over a contiguous copy
        return self.to_out[0](out[:, :video]), self.to_add_out(out[:, video:])


class HunyuanVideo15Block(nn.Module):
    """diffusers' HunyuanVideo15TransformerBlock (norm2 / norm2_context, LayerNorms without weights, are
    `modulate`'s)."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = AdaModulation(dim, 6)
        self.norm1_context = AdaModulation(dim, 6)
        self.attn = VideoFirstAttention(dim, head_dim)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.ff_context = FeedForward(dim, int(dim * mlp_ratio))

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img: [B, S_vid, D]; txt: [B, S_ctx, D] (valid tokens only); temb: [B, D]; rope: [S_vid + S_ctx, D_h/2, 2]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(temb)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        h_img, h_txt = self.norm1.modulate(img, shift1, scale1), self.norm1_context.modulate(txt, c_shift1, c_scale1)
        img_attn, txt_attn = self.attn(h_img, h_txt, rope)
        img = img + img_attn * gate1
        txt = txt + txt_attn * c_gate1
        img = img + gate2 * self.ff(self.norm1.modulate(img, shift2, scale2))
        txt = txt + c_gate2 * self.ff_context(self.norm1_context.modulate(txt, c_shift2, c_scale2))
        return img, txt


class HunyuanVideo15Transformer(nn.Module):
    """Velocity prediction for video latents [B, C, F, H, W] (C: noise, condition latents and their mask)."""

    def __init__(self, config: HunyuanVideo15TransformerConfig):
        super().__init__()
        if sum(config.rope_axes_dim) != config.attention_head_dim or len(config.rope_axes_dim) != 3:
            raise ValueError("rope_axes_dim must be 3 sizes that add up to attention_head_dim")
        if config.qk_norm != "rms_norm":
            raise ValueError(f"qk_norm {config.qk_norm!r} is not supported (HunyuanVideo-1.5 uses rms_norm)")
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.x_embedder = PatchEmbed(config.patch, config.in_channels, dim)
        self.image_embedder = ImageProjection(config.image_embed_dim, dim)
        self.context_embedder = TokenRefiner(config.text_embed_dim, heads, head_dim, config.num_refiner_layers)
        self.context_embedder_2 = ByT5Projection(config.text_embed_2_dim, dim)
        self.time_embed = TimeEmbedding(dim, config.use_meanflow)
        self.cond_type_embed = nn.Embedding(3, dim)
        self.transformer_blocks = nn.ModuleList(
            HunyuanVideo15Block(dim, head_dim, config.mlp_ratio) for _ in range(config.num_layers)
        )
        self.norm_out = AdaModulation(dim, 2)
        self.proj_out = Linear(dim, config.output_channels * config.patch_size_t * config.patch_size**2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep_r: torch.Tensor | None = None,
        encoder_hidden_states_2: torch.Tensor | None = None,
        encoder_attention_mask_2: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, C_in, F, H, W], the noise latents, the condition latents and their mask joined on
        channels (zeros for T2V); timestep: [B] in 0..1000 (rounded to the model's dtype, as the pipelines
        pass it); encoder_hidden_states: [B, L, text_embed_dim] Qwen2.5-VL prompt tokens with
        encoder_attention_mask [B, L]; timestep_r: [B], meanflow checkpoints only; encoder_hidden_states_2:
        [B, L2, text_embed_2_dim] ByT5 glyph tokens with encoder_attention_mask_2 [B, L2]; image_embeds:
        [B or 1, L_img, image_embed_dim] SigLIP tokens (I2V; None or all zeros: T2V). A mask None: every
        token valid (see the module's docstring). Returns the velocity [B, C_out, F, H, W]."""
        batch, _, frames, height, width = hidden_states.shape
        pt, ph, pw = self.config.patch
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latents of {frames}x{height}x{width} do not split into {pt}x{ph}x{pw} patches")
        check_mask(encoder_hidden_states, encoder_attention_mask, "encoder_attention_mask")
        if encoder_hidden_states_2 is None and encoder_attention_mask_2 is not None:
            raise ValueError("encoder_attention_mask_2 without encoder_hidden_states_2")
        if encoder_hidden_states_2 is not None:
            check_mask(encoder_hidden_states_2, encoder_attention_mask_2, "encoder_attention_mask_2")
        dtype = self.x_embedder.proj.weight.dtype
        timestep = timestep.to(dtype).reshape(-1).expand(batch)
        timestep_r = None if timestep_r is None else timestep_r.to(dtype).reshape(-1).expand(batch)
        if image_embeds is not None and not bool(image_embeds.any()):  # diffusers' T2V: no image tokens
            image_embeds = None
        if image_embeds is not None:
            image_embeds = image_embeds.expand(batch, -1, -1)

        groups = row_groups(batch, encoder_attention_mask, encoder_attention_mask_2)
        outputs = []
        for rows, (text_count, glyph_count) in groups:
            some = None if len(groups) == 1 else rows  # None: the whole batch, uncopied
            text_mask, glyph_mask = take(encoder_attention_mask, some), take(encoder_attention_mask_2, some)
            text = valid_tokens(take(encoder_hidden_states, some), text_mask, text_count)  # [b, n_text, C]
            glyphs = valid_tokens(take(encoder_hidden_states_2, some), glyph_mask, glyph_count)  # [b, n_glyph, C]
            latents, image = take(hidden_states, some), take(image_embeds, some)
            outputs.append(self.velocity(latents, take(timestep, some), text, glyphs, image, take(timestep_r, some)))
        if len(groups) == 1:
            return outputs[0]
        order = torch.tensor([row for rows, _ in groups for row in rows], device=hidden_states.device)
        return torch.cat(outputs)[torch.argsort(order)]  # back in the batch's order

    def velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        glyphs: torch.Tensor | None,
        image: torch.Tensor | None,
        timestep_r: torch.Tensor | None,
    ) -> torch.Tensor:
        """The forward over valid tokens only: latents [B, C_in, F, H, W]; timestep, timestep_r: [B] in the
        model's dtype; text [B, L, C_txt], glyphs [B, L2, C_glyph], image [B, L_img, C_img]."""
        b, _, frames, height, width = latents.shape
        pt, ph, pw = self.config.patch
        grid = (frames // pt, height // ph, width // pw)
        temb = self.time_embed(timestep, timestep_r)
        img = self.x_embedder(latents)  # [B, S_vid, D]
        kinds = self.cond_type_embed.weight  # [3, D]
        context = []  # diffusers' order: image, glyph, prompt tokens
        if image is not None:
            context.append(self.image_embedder(image) + kinds[IMAGE])
        if glyphs is not None and glyphs.shape[1]:
            context.append(self.context_embedder_2(glyphs) + kinds[GLYPH])
        context.append(self.context_embedder(text, timestep) + kinds[PROMPT])
        txt = torch.cat(context, dim=1) if len(context) > 1 else context[0]  # [B, S_ctx, D]
        rope = video_rope(grid, self.config.rope_axes_dim, self.config.rope_theta, img.device)
        rope = joint_rope(rope, txt.shape[1])  # [S_vid + S_ctx, D_h/2, 2]

        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, rope)

        scale, shift = self.norm_out(temb)
        out = self.proj_out(self.norm_out.modulate(img, shift, scale))
        # [B, S, C*pt*ph*pw] -> [B, C, F, H, W]: a token's channels come before its patch offsets (diffusers' order)
        out = out.reshape(b, *grid, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)
