"""Text encoders: transformers' CLIPTextModel (clip.py) and T5EncoderModel / UMT5EncoderModel (t5.py) forward
passes, for what the diffusion pipelines read from them (CLIP's pooled output and last hidden state, T5's
last hidden state).

Math only. Parameter names are transformers' (`text_model.embeddings.token_embedding.weight`,
`encoder.block.0.layer.0.SelfAttention.q.weight`, `shared.weight`, ...), so the checkpoints' safetensors load
with `load_state_dict(assign=True)`; T5's `encoder.embed_tokens` is `shared` (tied) and is not built.

    CLIP: token + position embeddings -> pre-LN layers (causal self-attention, MLP) -> final LayerNorm;
          pooled = the final hidden state at the end-of-text token
    T5:   shared embedding -> pre-RMS-norm layers (self-attention with a relative position bias, no 1/sqrt(d)
          scaling; gated or plain feed-forward) -> final RMS norm

The attention calls SDPA directly with an explicit mask or bias, not models/attention.py: the entry point takes
no mask, and it is what --attention-backend and sequence parallelism swap, while a prompt is encoded whole on
one rank (as it was when transformers' models ran here). The dtype steps are transformers' where they change
low-precision results: T5's norm in float32 then cast to its weight's dtype, the feed-forward's input cast to
`wo`'s dtype (float32 at float16, where the loader keeps `wo` so), fp16 activations clamped after each sub-layer.
"""

from sgdiff.models.text.clip import ClipTextConfig, ClipTextEncoder
from sgdiff.models.text.common import TextEncoding
from sgdiff.models.text.t5 import T5Encoder, T5EncoderConfig

__all__ = ["ClipTextConfig", "ClipTextEncoder", "T5Encoder", "T5EncoderConfig", "TextEncoding"]
