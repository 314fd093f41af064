"""CPU offload: weights kept in (pinned) CPU memory and lent to the compute device only while they run
(config.OffloadConfig; apply.py applies it, in one place). Every mode is lossless: the same bytes, at the
same alignment, run the same kernels."""
