#!/usr/bin/env bash
# GPU smoke check: cpt, extract, merge, finetune and evaluate on the tiny encoder and decoder,
# with bf16 picked automatically on a GPU that supports it; prints device, precision and metrics.
# Usage: scripts/gpu_smoke.sh [RUN_ROOT]   (installs into .venv-gpu when cmmerge is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/tmp/cmmerge-gpu-smoke}
if ! python -c "import cmmerge" 2>/dev/null; then
  python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
  python -c "import torch" 2>/dev/null || pip install -q torch
  pip install -q -e .
fi
python - <<'EOF_PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print("device:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported(),
      "| torch", torch.__version__)
EOF_PY
export CMMERGE_CACHE="$root/cache"
for model in tiny-xlmr tiny-llama; do
  cmmerge pipeline experiment=demo model=$model run.root="$root" run.name=$model \
    'pipeline.merges=[{method: ties, lambda: 1.0, density: 0.2}]' 2>&1 | tail -n 12
done
python - "$root" <<'EOF_PY'
import json, sys
from pathlib import Path
for manifest in sorted(Path(sys.argv[1]).glob("*/*/**/manifest.json")):
    m = json.loads(manifest.read_text())
    if m["stage"] in ("cpt", "finetune", "evaluate"):
        keys = ("macro_f1", "perplexity", "accuracy")
        metrics = {k: round(v, 4) for k, v in m["metrics"].items() if k in keys}
        print(f"{m['stage']:9} {manifest.parent.relative_to(sys.argv[1])}: {metrics} "
              f"precision={m.get('precision')} peak_gpu_mb={m.get('peak_gpu_mb')}")
EOF_PY
