#!/usr/bin/env bash
# Reproduces the README's "Anchor design" figures: fit + check + pictures on synthetic COCO-format
# sets (skewed shapes against yolov5; COCO-like against retinanet_torchvision). ~5 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/anchor_design
data=$(mktemp -d)
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
$py - "$data" <<'PY'
import json, sys
from tritarget.clients.anchor_design import synthetic
json.dump(synthetic.skewed(300, seed=0), open(f"{sys.argv[1]}/skewed.json", "w"))
json.dump(synthetic.coco_like(2000, seed=1), open(f"{sys.argv[1]}/coco_like.json", "w"))
PY
tt="$py -m tritarget.service.cli anchors"
$tt fit --annotations "$data/skewed.json" --no-resize --preset yolov5 --out "$out/yolov5_skewed.json" \
    --backend cpu --quiet | tee "$out/fit_yolov5_skewed.txt"
$tt show --annotations "$data/skewed.json" --no-resize --preset yolov5 --config "$out/yolov5_skewed.json" \
    --image-id 3 --out-dir "$out" --backend cpu --quiet
$tt fit --annotations "$data/coco_like.json" --preset retinanet_torchvision --generations 150 \
    --out "$out/retinanet_coco_like.json" --backend cpu --quiet | tee "$out/fit_retinanet_coco_like.txt"
rm -r "$data"
