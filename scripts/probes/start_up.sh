#!/usr/bin/env bash
# On the GPU machine: where a fresh process's start-up goes (issue 26). Prints import times of torch,
# CUDA initialisation, sgdiff's CLI imports (-X importtime, the largest), and whether the installed
# packages have their bytecode compiled (a package without .pyc files is compiled on every start).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log-start-up.txt") 2>&1
pip install --no-index --no-deps --target /tmp/site -q .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
T=$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
echo "torch at $T; writable: $(test -w "$T" && echo yes || echo no); .pyc files: $(find "$T" -name '*.pyc' | wc -l); .py files: $(find "$T" -name '*.py' | wc -l)"
for i in 1 2 3; do /usr/bin/time -f "import torch: %e s" python -c 'import torch'; done
/usr/bin/time -f "import torch + CUDA init: %e s" python -c 'import torch; torch.zeros(1, device="cuda")'
/usr/bin/time -f "python -c pass: %e s" python -c 'pass'
/usr/bin/time -f "sgdiff --help: %e s" python -c 'from sgdiff.cli.main import main; main()' --help > /dev/null
python -X importtime -c 'from sgdiff.cli.main import main' 2> "$OUT/importtime-cli.txt"
sort -t'|' -k2 -n -r "$OUT/importtime-cli.txt" | head -25
