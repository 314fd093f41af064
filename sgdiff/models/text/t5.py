"""transformers' T5EncoderModel / UMT5EncoderModel forward: shared embedding -> pre-RMS-norm layers
(self-attention with a relative position bias, no 1/sqrt(d) scaling; gated or plain feed-forward) -> final
RMS norm. Names as transformers'; `encoder.embed_tokens` is `shared` (tied) and is not built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sgdiff.errors import UserError
from sgdiff.models.loading import config_fields
from sgdiff.models.text.common import ACTIVATIONS, TextEncoding, embedding, refuse_activation

T5_TYPES = ("t5", "umt5")
UMT5_DEFAULTS = {"vocab_size": 250112, "d_ff": 1024, "num_layers": 8, "num_heads": 6, "feed_forward_proj": "gated-gelu"}


@dataclass(frozen=True)
class T5EncoderConfig:
    """The fields of a T5Config / UMT5Config `config.json` the encoder uses (defaults: transformers' for the
    config's model_type). UMT5 differs only in giving every layer its own relative position bias."""

    model_type: str = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dense_act_fn: str = "relu"  # from feed_forward_proj unless the file names it (transformers lets the file win)
    is_gated_act: bool = False
    source: str = field(default="the T5 config", compare=False, repr=False)

    def __post_init__(self) -> None:
        where = self.source
        if self.model_type not in T5_TYPES:
            raise UserError(f"{where}: model_type '{self.model_type}' is not a T5 encoder ({' or '.join(T5_TYPES)})")
        refuse_activation(where, "dense_act_fn", self.dense_act_fn)
        if self.relative_attention_num_buckets < 4:
            raise UserError(f"{where}: relative_attention_num_buckets {self.relative_attention_num_buckets} is < 4")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise UserError(
                f"{where}: relative_attention_max_distance {self.relative_attention_max_distance} must exceed "
                f"relative_attention_num_buckets / 4"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "the T5 config") -> T5EncoderConfig:
        model_type = raw.get("model_type", "t5")
        if raw.get("is_decoder"):
            raise UserError(f"{source}: is_decoder is true; sgdiff's T5 encoder runs the bidirectional encoder only")
        known = {**(UMT5_DEFAULTS if model_type == "umt5" else {}), **config_fields(cls, raw)}
        proj = known.get("feed_forward_proj", cls.feed_forward_proj)
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise UserError(f"{source}: feed_forward_proj '{proj}' is not 'ACT' or 'gated-ACT'")
        known.setdefault("dense_act_fn", "gelu_new" if proj == "gated-gelu" else parts[-1])
        known.setdefault("is_gated_act", parts[0] == "gated")
        return cls(**known, source=source)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' T5 keeps fp16 activations finite after each sub-layer (a little under the maximum once one
    overflowed); other dtypes pass unchanged."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


class T5Norm(nn.Module):
    """RMS norm, no mean subtraction, no bias; the variance in float32, the result cast to a half weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """[S_q, S_k] bucket of each key position relative to each query position, bidirectional: half the buckets
    for keys after the query; within a half, one bucket per distance below a quarter of num_buckets, then
    log-spaced buckets up to max_distance (the same float32 steps as transformers)."""
    position = torch.arange(length, dtype=torch.long, device=device)
    relative = position[None, :] - position[:, None]  # [S_q, S_k]: key - query
    half = num_buckets // 2
    exact = half // 2
    distance = relative.abs()
    scaled = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + scaled.to(torch.long)).clamp(max=half - 1)
    return (relative > 0).to(torch.long) * half + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_bias: bool):
        super().__init__()
        inner, self.heads = config.num_heads * config.d_kv, config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        buckets = config.relative_attention_num_buckets
        self.relative_attention_bias = embedding(buckets, self.heads) if has_bias else None

    def position_bias(self, buckets: torch.Tensor) -> torch.Tensor:  # [S, S] -> [1, H, S, S]
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # type: ignore[misc]  # (has_bias)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x: [B, S, D]; bias: [1, H, S, S] added to the scores; keep: None or bool [B, 1, 1, S] (False: padding)."""
        b, s, _ = x.shape
        # [B, S, H*Dkv] -> [B, S, H, Dkv] -> [B, H, S, Dkv]
        q, k, v = (proj(x).view(b, s, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        if keep is not None:  # padded keys get the dtype's lowest score; [1, H, S, S] -> [B, H, S, S]
            bias = torch.where(keep, bias, torch.finfo(k.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5 does not scale q.k
        return self.o(out.transpose(1, 2).reshape(b, s, -1))  # [B, H, S, Dkv] -> [B, S, H*Dkv]


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_bias)
        self.layer_norm = T5Norm(config.d_model, config.layer_norm_epsilon)


class T5FeedForward(nn.Module):
    """wo(act(wi_0 x) * wi_1 x) when gated, else wo(act(wi x)); wo's input is cast to wo's dtype (float32
    where it was kept so)."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        if config.is_gated_act:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act, self.gated = ACTIVATIONS[config.dense_act_fn], config.is_gated_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S, D]
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h.to(self.wo.weight.dtype))


class T5FeedForwardLayer(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.DenseReluDense = T5FeedForward(config)
        self.layer_norm = T5Norm(config.d_model, config.layer_norm_epsilon)


class T5Block(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(config, has_bias), T5FeedForwardLayer(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        attention, feed_forward = self.layer  # (nn.ModuleList's items are typed Module: their attributes unknown)
        x = clamp_fp16(x + attention.SelfAttention(attention.layer_norm(x), bias, keep))  # type: ignore[operator]
        return clamp_fp16(x + feed_forward.DenseReluDense(feed_forward.layer_norm(x)))  # type: ignore[operator]


class T5Stack(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        every_layer = config.model_type == "umt5"
        self.block = nn.ModuleList([T5Block(config, has_bias=every_layer or i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = T5Norm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """transformers' T5EncoderModel (UMT5EncoderModel for model_type "umt5"): input ids [B, S] and an optional
    padding mask [B, S] (1: token, 0: padding, hidden as keys) -> TextEncoding with last_hidden_state [B, S, D].

    The relative position bias of T5's first layer serves every layer; UMT5's layers each have their own."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.config = config
        self.shared = embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextEncoding:
        config = self.config
        x = self.shared(input_ids)  # [B, S, D]
        buckets = relative_position_buckets(
            input_ids.shape[1], config.relative_attention_num_buckets, config.relative_attention_max_distance, x.device
        )
        keep = None  # [B, 1, 1, S]: the keys each row attends to
        if attention_mask is not None:
            keep = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        bias = None
        for block in self.encoder.block:
            attention = block.layer[0].SelfAttention  # type: ignore[index,union-attr]  # (nn.ModuleList's items)
            if attention.relative_attention_bias is not None:  # T5: the first layer's, kept for the others
                bias = attention.position_bias(buckets)  # [1, H, S, S]
            x = block(x, bias, keep)
        return TextEncoding(self.encoder.final_layer_norm(x))
