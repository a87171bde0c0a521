#!/usr/bin/env bash
# One virtual environment per peer tool, so that no peer changes the main environment's torch or transformers.
#   bash benchmarks/peers/install_peers.sh [VENV_ROOT]     (default benchmarks/out/peers/venvs; run.py looks there)
#   TOOLS="autoround:auto-round" bash benchmarks/peers/install_peers.sh   (only these venv:package pairs)
# Each venv sees the main environment's packages (--system-site-packages: hf_qlimit's dependencies, datasets) and
# pins torch to the main environment's version, so pip never fetches another torch. A failed install leaves its
# pip output in VENV_ROOT/logs/<tool>.log; run.py shows its first error line in the table.
set -u
ROOT=${1:-$(dirname "$0")/../out/peers/venvs}
PY=${PYTHON:-python}
TORCH=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
mkdir -p "$ROOT/logs"
TOOLS=${TOOLS:-"quanto:optimum-quanto llmcompressor:llmcompressor gptqmodel:gptqmodel autoround:auto-round"}
for spec in $TOOLS; do
  name=${spec%%:*}; pkg=${spec#*:}
  $PY -m venv --system-site-packages "$ROOT/$name"
  timeout 900 "$ROOT/$name/bin/pip" install "torch==$TORCH" "$pkg" > "$ROOT/logs/$name.log" 2>&1
  echo "rc=$?" >> "$ROOT/logs/$name.log"
  tail -2 "$ROOT/logs/$name.log"
done
