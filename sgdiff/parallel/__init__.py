"""Parallelism applied to a built pipeline from outside: CFG branches on different ranks and
sequence-parallel attention (Ulysses, Ring, USP). Model code never imports torch.distributed."""
