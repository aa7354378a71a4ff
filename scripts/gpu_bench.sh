#!/usr/bin/env bash
# The GPU comparison in one go, on a machine with a GPU, its Vulkan driver and PyTorch:
# `wgpu-softmax info` and `check` through Vulkan, then ROUNDS rounds each of `wgpu-softmax bench
# --json` and `scripts/torch_reference.py --json` (CUDA), and the README table built from them by
# `scripts/bench_table.py`, and the time of each dispatch of the split-row shapes
# (`bench --dispatches`); the softmax-family ops along dim 1 of [N, C, S] as well. Everything
# lands in OUT, each step's seconds in OUT/timing.tsv.
#
#   cargo build --release && scripts/gpu_bench.sh
#
# Environment: OUT (default gpu-results), ROUNDS (default 3), WGPU_SOFTMAX (the runner binary,
# default target/release/wgpu-softmax), PYTHON (default python3), WGPU_BACKEND (default vulkan).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
rounds=${ROUNDS:-3}
bin=${WGPU_SOFTMAX:-target/release/wgpu-softmax}
python=${PYTHON:-python3}
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}
mkdir -p "$out"
printf 'step\tseconds\n' >"$out/timing.tsv"
SECONDS=0
mark=0
timed() { printf '%s\t%s\n' "$1" "$((SECONDS - mark))" >>"$out/timing.tsv"; mark=$SECONDS; }

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true; } \
  >"$out/machine.txt"
"$bin" info >"$out/info.txt" 2>&1
"$bin" check >"$out/check.txt" 2>&1 || echo "check failed: see $out/check.txt"
timed "info and check"
# Along dim 1 of [N, C, S], the shapes of the README's table along an axis: the classes of
# 128 x 128 segmentation maps, a square's columns, few long lines four apart, short lines in
# slabs of 256, and dim 0 of a 4096 x 4096 matrix.
axis_shapes="--shape 16x21x16384 --shape 4x1024x1024 --shape 64x16384x4 --shape 256x32x256"
axis_shapes+=" --shape 1x4096x4096"
for i in $(seq 1 "$rounds"); do
  "$bin" bench --no-cpu --json >"$out/bench_$i.json" 2>"$out/bench_$i.err"
  timed "bench, round $i"
  "$python" scripts/torch_reference.py --json >"$out/torch_$i.json" 2>"$out/torch_$i.err"
  timed "torch, round $i"
  # shellcheck disable=SC2086
  "$bin" bench --no-cpu --json $axis_shapes >"$out/bench_axis_$i.json" 2>"$out/bench_axis_$i.err"
  # shellcheck disable=SC2086
  "$python" scripts/torch_reference.py --json $axis_shapes \
    >"$out/torch_axis_$i.json" 2>"$out/torch_axis_$i.err"
  timed "along an axis, bench and torch, round $i"
done
"$bin" bench --no-cpu --dispatches --shape 64x262144 --shape 4x524288 >"$out/dispatches.txt" 2>&1 ||
  echo "bench --dispatches failed: see $out/dispatches.txt"
timed "dispatches"
"$python" scripts/bench_table.py "$out"/bench_*.json "$out"/torch_*.json \
  >"$out/table.md" 2>"$out/limits.txt"
cat "$out/machine.txt" "$out/table.md" "$out/limits.txt"
