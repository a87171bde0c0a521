#!/usr/bin/env bash
# The any-model matrix (tests/test_any_model.py) on the oldest transformers that pyproject.toml allows.
#   bash benchmarks/compat/lower_bound.sh [VENV] [PYTEST ARGS...]   (default VENV benchmarks/out/compat/venv-tf<lower>)
#   bash benchmarks/compat/lower_bound.sh -k "llama or t5"          (a subset, in the default venv)
# Builds the venv once (torch pinned to the main environment's version, so pip never fetches another torch;
# hf_qlimit installed editable from this checkout), checks that every zoo model builds and runs a forward, then runs
# the matrix offline on one thread. Exit status: pytest's.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python}
LOWER=$(sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' "$REPO/pyproject.toml" | head -1)
VENV=$REPO/benchmarks/out/compat/venv-tf$LOWER
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then VENV=$1; shift; fi
TORCH=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
if [ ! -x "$VENV/bin/python" ]; then
  $PY -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH" && "$VENV/bin/pip" install -q -e "$REPO[test]" "transformers==$LOWER.*" || exit 1
fi
"$VENV/bin/python" -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
cd "$REPO/tests" && OMP_NUM_THREADS=1 "$VENV/bin/python" -c "
import model_zoo as zoo
for t in zoo.MATRIX + zoo.SHARED_LAYER:
    zoo.outputs(zoo.build(t), zoo.eval_batch(t))
print('zoo: all', len(zoo.MATRIX + zoo.SHARED_LAYER), 'types build and run')
" || exit 1
cd "$REPO" && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TQDM_DISABLE=1 "$VENV/bin/python" -m pytest tests/test_any_model.py -q \
  -p no:cacheprovider "$@"
