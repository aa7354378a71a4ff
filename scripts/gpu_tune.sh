#!/usr/bin/env bash
# Sweeps the kernel-choice table (`Tuning`) on the adapter at hand: runs `wgpu-softmax bench
# --no-cpu --json` once with the defaults and once per override set below, each set on the
# shapes its fields can change, and prints what `scripts/tune_table.py` makes of the results:
# per set, op and shape, the ratio of its GB/s to the defaults'. Meant for a machine with a GPU,
# where `Tuning::GPU` has not been measured; everything lands in OUT.
#
#   cargo build --release && scripts/gpu_tune.sh
#
# Environment: OUT (default gpu-results/tune), ROUNDS (default 2: the sets run in turn, ROUNDS
# times, so that drift affects them alike), REPEATS (default 9), SETS (names of the sets to run,
# space-separated; default all), SHAPES (replaces every set's shapes, e.g. "32x10" for a dry
# run), BUDGET (seconds: no set starts once the sweep has run this long, and the table is made
# of what ran; default none), WGPU_SOFTMAX (default target/release/wgpu-softmax), PYTHON
# (default python3), WGPU_BACKEND (default vulkan).
#
# The sets run in the order below: the defaults, then the fields no GPU has timed yet (one-pass
# split rows of the backward and cross-entropy, the ops along an axis, unaligned rows), then
# the ones that confirm the defaults. Each set's seconds go to OUT/timing.tsv, so that a
# BUDGET for a machine held for a short time can be planned from a previous sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results/tune}
rounds=${ROUNDS:-2}
repeats=${REPEATS:-9}
budget=${BUDGET:-0}
bin=${WGPU_SOFTMAX:-target/release/wgpu-softmax}
python=${PYTHON:-python3}
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}

all="4096x4096 16384x1024 65536x128 64x262144 4x524288 32x10"
short="65536x128 32x10"
medium="4096x4096 16384x1024 65536x128"
long="64x262144 4x524288"
axis="16x21x16384 4x1024x1024 64x16384x4 256x32x256 1x4096x4096"
# Rows that are not a multiple of 4 columns: CIFAR's 10 classes, BERT's 30 522, GPT-2's 50 257.
unaligned="70000x10 65536x127 16384x1023 1024x30522 1024x50257 64x262143"
# name | overrides (space-separated FIELD=VALUE) | shapes
sets="
default||$all $axis $unaligned
vector=1|vector=1|$all $unaligned
unaligned_items=1|unaligned_items=1|$unaligned
loss_split_wait=256|loss_split_wait=256|$long
loss_split_wait=4096|loss_split_wait=4096|$long
loss_split_wait=65536|loss_split_wait=65536|$long
loss_split_wait=4096,split_chunk=8192|loss_split_wait=4096 split_chunk=8192|$long
axis_vec4_max_inner=0|axis_vec4_max_inner=0|$axis
axis_vec4_max_inner=32|axis_vec4_max_inner=32|$axis
axis_workgroup=64|axis_workgroup=64|$axis
axis_workgroup=256|axis_workgroup=256|$axis
axis_min_chunk=256|axis_min_chunk=256|$axis
axis_min_chunk=4096|axis_min_chunk=4096|$axis
axis_lines=262144|axis_lines=262144|$axis
backward_split_wait=256|backward_split_wait=256|$long
backward_split_wait=4096|backward_split_wait=4096|$long
backward_split_wait=65536|backward_split_wait=65536|$long
split_alone=1|split_alone=1|$long
split_alone=1,all_waits=4096|split_alone=1 loss_split_wait=4096 backward_split_wait=4096|$long
all_waits=4096|loss_split_wait=4096 backward_split_wait=4096|$long
thread_max_cols=32|thread_max_cols=32|$short
thread_max_cols=128,max_items=32|thread_max_cols=128 max_items=32|$short
thread_workgroup=256|thread_workgroup=256|$short
subgroup_workgroup=64|subgroup_workgroup=64|$medium
subgroup_workgroup=128|subgroup_workgroup=128|$medium
subgroup_max_cols=256|subgroup_max_cols=256|$medium
subgroup_max_cols=4096|subgroup_max_cols=4096|$medium
subgroup_max_cols=4096,max_items=32|subgroup_max_cols=4096 max_items=32|$medium
row_workgroup=64|row_workgroup=64|$medium $long
row_workgroup=128|row_workgroup=128|$medium $long
max_items=8|max_items=8|$medium
max_items=32|max_items=32|$medium
subgroups=0|subgroups=0|$all
subgroups=0,thread_max_cols_without_subgroups=128|subgroups=0 thread_max_cols_without_subgroups=128|$short
subgroups=0,thread_max_cols_without_subgroups=1024|subgroups=0 thread_max_cols_without_subgroups=1024|$medium
subgroups=0,row_workgroup=32|subgroups=0 row_workgroup=32|$medium $long
subgroups=0,row_workgroup=64|subgroups=0 row_workgroup=64|$medium $long
split_chunk=2048|split_chunk=2048|$long
split_chunk=8192|split_chunk=8192|$long
split_chunk=16384|split_chunk=16384|$long
split_team=0|split_team=0|$long
split_reverse=0|split_reverse=0|$long
batch_rows=16|batch_rows=16|$medium
workgroup_per_row=0|workgroup_per_row=0|$medium $long
batch_team=0|batch_team=0|$short
batch_tally=1|batch_tally=1|$medium
batch_tally=1,batch_rows=16|batch_tally=1 batch_rows=16|$medium
loss_tally=1|loss_tally=1|$medium 32x10
loss_tally=1,batch_tally=1|loss_tally=1 batch_tally=1|$medium 32x10
split_min_cols=65536|split_min_cols=65536|$long
split_max_rows=64|split_max_rows=64|$long
split_group_bytes=8MiB|split_group_bytes=8388608|$long
split_group_bytes=16MiB|split_group_bytes=16777216|$long
split_group_bytes=32MiB|split_group_bytes=33554432|$long
split_wait=256|split_wait=256|$long
split_wait=4096|split_wait=4096|$long
split_wait=65536|split_wait=65536|$long
split_wait=4096,split_chunk=2048|split_wait=4096 split_chunk=2048|$long
split_wait=4096,split_chunk=8192|split_wait=4096 split_chunk=8192|$long
split_wait=4096,split_chunk=16384|split_wait=4096 split_chunk=16384|$long
"

mkdir -p "$out"
rm -f "$out"/set_* "$out/sets.tsv"
wanted=" ${SETS:-} "
index=0
while IFS='|' read -r name overrides shapes; do
  [ -n "$name" ] || continue
  if [ -n "${SETS:-}" ] && [ "$name" != default ] && [[ "$wanted" != *" $name "* ]]; then
    continue
  fi
  index=$((index + 1))
  printf '%s\t%s\t%s\n' "$index" "$name" "$overrides" >>"$out/sets.tsv"
  args=()
  for o in $overrides; do args+=(--tune "$o"); done
  for s in ${SHAPES:-$shapes}; do args+=(--shape "$s"); done
  printf '%s\n' "${args[@]}" >"$out/set_$index.args"
done <<<"$sets"

printf 'round\tset\tseconds\n' >"$out/timing.tsv"
SECONDS=0
for round in $(seq 1 "$rounds"); do
  while IFS=$'\t' read -r index name _; do
    if [ "$budget" -gt 0 ] && [ "$SECONDS" -ge "$budget" ]; then
      echo "BUDGET=$budget s spent: round $round stopped before $name" | tee -a "$out/timing.tsv" >&2
      break 2
    fi
    mapfile -t args <"$out/set_$index.args"
    echo "round $round: $name" >&2
    started=$SECONDS
    "$bin" bench --no-cpu --json --repeats "$repeats" "${args[@]}" \
      >"$out/set_${index}_r$round.json" 2>>"$out/bench.err"
    printf '%s\t%s\t%s\n' "$round" "$name" "$((SECONDS - started))" >>"$out/timing.tsv"
  done <"$out/sets.tsv"
done
"$python" scripts/tune_table.py "$out" | tee "$out/tune.md"
