"""transformers' CLIPTextModel forward: token + position embeddings -> pre-LN layers (causal self-attention,
MLP) -> final LayerNorm; pooled = the final hidden state at the end-of-text token. Names as transformers'."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sgdiff.errors import UserError
from sgdiff.models.loading import config_fields
from sgdiff.models.text.common import ACTIVATIONS, TextEncoding, embedding, refuse_activation


@dataclass(frozen=True)
class ClipTextConfig:
    """The fields of a CLIPTextConfig `text_encoder/config.json` the forward uses (defaults: transformers')."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2: the pre-2023 configs' value, which makes the pooling take the largest id
    source: str = field(default="the CLIP text config", compare=False, repr=False)

    def __post_init__(self) -> None:
        refuse_activation(self.source, "hidden_act", self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"{self.source}: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "the CLIP text config") -> ClipTextConfig:
        model_type = raw.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise UserError(f"{source}: model_type '{model_type}' is not a CLIP text model ('clip_text_model')")
        known = config_fields(cls, raw)
        eos = known.get("eos_token_id", cls.eos_token_id)
        if isinstance(eos, tuple) and len(eos) == 1:  # a list of one id pools as that id
            eos = known["eos_token_id"] = eos[0]
        if not isinstance(eos, int):
            raise UserError(f"{source}: eos_token_id {eos!r} is not supported (the pooled output needs one id)")
        return cls(**known, source=source)


class ClipAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, S, D]; mask: None (causal) or bool [B, 1, S, S] (True: attend)."""
        b, s, d = x.shape
        # [B, S, D] -> [B, S, H, Dh] -> [B, H, S, Dh]
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))  # [B, H, S, Dh] -> [B, S, D]


class ClipMlp(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        dim = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.self_attn = ClipAttention(dim, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = ClipMlp(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # [B, S, D] -> [B, S, D]
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.token_embedding = embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, D]
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


class ClipLayers(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([ClipLayer(config) for _ in range(config.num_hidden_layers)])


class ClipTextTransformer(nn.Module):
    """The modules under `text_model.` (transformers 5 saves CLIPTextModel without that prefix: these names)."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(config)
        self.encoder = ClipLayers(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class ClipTextEncoder(nn.Module):
    """transformers' CLIPTextModel: input ids [B, S] (S <= max_position_embeddings) -> TextEncoding with
    last_hidden_state [B, S, D] and pooler_output [B, D], the hidden state at each row's end-of-text token."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = config
        self.text_model = ClipTextTransformer(config)

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextEncoding:
        """attention_mask: [B, S], 1 for tokens, 0 for padding (hidden as keys, on top of the causal mask);
        None: causal only, as diffusers' FLUX pipelines call it."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens, more than max_position_embeddings")
        model = self.text_model
        x = model.embeddings(input_ids)
        mask = None
        if attention_mask is not None:
            s = input_ids.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()  # [S, S]
            mask = causal[None, None] & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        for layer in model.encoder.layers:
            x = layer(x, mask)
        x = model.final_layer_norm(x)  # [B, S, D]
        return TextEncoding(x, x[torch.arange(x.shape[0], device=x.device), self.pooled_positions(input_ids)])

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B]: where each row's end-of-text token is, as transformers finds it: the first `eos_token_id`, or
        (eos_token_id 2, old configs) the largest id, the end-of-text token being the vocabulary's last."""
        ids = input_ids.to(torch.int)
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)  # 0 where a row has none
