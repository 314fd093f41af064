"""`python -m sgdiff.cli` (what torchrun runs: `torchrun --nproc-per-node N -m sgdiff.cli generate ...`)."""

from sgdiff.cli.main import main

main()
