"""One rule of the original names: an original module's name (a regular expression whose groups are block
numbers) and the layers of ours it stands for, stacked by rows in that order (`{0}`: its block number)."""

from __future__ import annotations

Rule = tuple[str, tuple[str, ...]]


def attention_rules(original: str, ours: str, names: dict[str, str]) -> list[Rule]:
    """One rule for each of an attention's projections: `{original}.{theirs}` -> `{ours}.{mine}`."""
    return [(rf"{original}\.{theirs}", (f"{ours}.{mine}",)) for theirs, mine in names.items()]


def stacked(prefix: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """`prefix.name` for each name: the layers whose rows one joint original module stacks."""
    return tuple(f"{prefix}.{name}" for name in names)


QKV = ("attn.to_q", "attn.to_k", "attn.to_v")  # a joint q/k/v projection of the image (or only) stream
ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")  # ... of the text stream
# the final layer's modulation: (shift, scale) in the original trainers' FLUX.1 and HunyuanVideo, (scale, shift) in ours
FINAL_MODULATION = r"final_layer\.adaLN_modulation\.1"
