#!/usr/bin/env bash
# The whole GPU cost check in one call (run on a machine with a CUDA GPU and sfm_lib importable):
# SFM step time and peak memory at the papers' ImageNet-100 scale, the two-pass mode at ImageNet-1k
# scale, and the lean reference probe side by side (pass its path as $1), so ratios come from one run.
set -uo pipefail
OUT=${OUT:-.}
B="python -m sfm_lib bench step --backbone dinov2_vitb14 --random-weights --device cuda --resolution 256 --crop 224"
$B --classes 100 --ipc 1 --augs 1 --json "$OUT/sfm_c100_a1.json"
$B --classes 100 --ipc 1 --augs 1 --no-optimizer --json "$OUT/sfm_c100_a1_noopt.json"
$B --classes 1000 --ipc 10 --two-pass --chunk-size 256 --no-optimizer --steps 2 --json "$OUT/sfm_c1000_ipc10_2pass.json"
if [ $# -ge 1 ]; then python "$1"; fi
