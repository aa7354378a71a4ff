#!/usr/bin/env python3
"""Summarises a `scripts/gpu_tune.sh` sweep.

Reads OUT/sets.tsv (index, name, overrides) and the `wgpu-softmax bench --json` records of every
set and round (OUT/set_<index>_r<round>.json), and prints Markdown: the defaults' GB/s and share
of the copy limit per op and shape, then for each override set and shape the ratio of its GB/s to
the defaults' (medians over the rounds; above 1 is faster) with the number of ops whose kernel
it changes, and last, per shape, the set with the best geometric-mean ratio over the ops among
those that change a kernel there.

    python3 scripts/tune_table.py gpu-results/tune
"""

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

OPS = ["softmax", "log-softmax", "softmax-backward", "log-softmax-backward", "cross-entropy"]


def load(out):
    sets = []
    for line in (out / "sets.tsv").read_text().splitlines():
        index, name, overrides = (line.split("\t") + [""])[:3]
        sets.append((index, name, overrides))
    # set name -> (op, rows, cols, inner) -> list of (gb_per_s, pct_of_limit)
    runs = defaultdict(lambda: defaultdict(list))
    # set name -> (op, rows, cols, inner) -> what ran
    kernels = defaultdict(dict)
    adapters = set()
    for index, name, _ in sets:
        for path in sorted(out.glob(f"set_{index}_r*.json")):
            for r in json.loads(path.read_text() or "[]"):
                if r["device"] != "gpu":
                    continue
                adapters.add(r.get("adapter", "?"))
                key = (r["op"], r["rows"], r["cols"], r.get("inner", 1))
                runs[name][key].append((r["gb_per_s"], r["pct_of_limit"]))
                kernels[name][key] = r.get("kernel", "")
    medians = {
        name: {key: (statistics.median(g for g, _ in v), statistics.median(p for _, p in v))
               for key, v in cases.items()}
        for name, cases in runs.items()
    }
    return sets, medians, kernels, adapters


def shape_order(keys):
    """The shapes (rows, cols, inner) of `keys`, in order of appearance."""
    seen = []
    for _, *shape in keys:
        if tuple(shape) not in seen:
            seen.append(tuple(shape))
    return seen


def label(shape):
    """`RxC` for rows, `NxCxS` along dim 1 of [N, C, S]."""
    rows, cols, inner = shape
    return f"{rows}x{cols}" if inner == 1 else f"{rows // inner}x{cols}x{inner}"


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    sets, medians, kernels, adapters = load(Path(argv[1]))
    base = medians.get("default")
    if not base:
        sys.exit("no records of the default set")
    ops = [op for op in OPS if any(k[0] == op for k in base)]
    shapes = shape_order(base)
    print("Adapter: " + "; ".join(sorted(adapters)))
    print()
    print("Defaults: GB/s (% of the in-run copy), medians over the rounds.")
    print()
    print("| op | " + " | ".join(label(shape) for shape in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for op in ops:
        cells = []
        for shape in shapes:
            v = base.get((op, *shape))
            cells.append(f"{v[0]:.3g} ({v[1]:.0f}%)" if v else "")
        print(f"| {op} | " + " | ".join(cells) + " |")
    print()
    print("Kernels of the defaults:")
    print()
    for shape in shapes:
        ran = [f"{op}: {kernels['default'].get((op, *shape), '?')}" for op in ops]
        print(f"- {label(shape)}: " + "; ".join(ran))
    print()
    print("Each set against the defaults: GB/s of the set / GB/s of the defaults; `changed`:")
    print("the ops whose kernel the set changes (the other ratios are run-to-run variation).")
    print()
    print("| set | shape | " + " | ".join(ops) + " | geomean | changed |")
    print("|---|---|" + "---|" * (len(ops) + 2))
    best = {}
    for _, name, overrides in sets:
        if name == "default" or name not in medians:
            continue
        for shape in shape_order(medians[name]):
            ratios = []
            cells = []
            for op in ops:
                v, b = medians[name].get((op, *shape)), base.get((op, *shape))
                if v and b:
                    ratios.append(v[0] / b[0])
                    cells.append(f"{v[0] / b[0]:.2f}")
                else:
                    cells.append("")
            if not ratios:
                continue
            mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            changed = sum(
                1 for op in ops
                if (op, *shape) in kernels[name]
                and kernels[name][(op, *shape)] != kernels["default"].get((op, *shape))
            )
            print(f"| {name} | {label(shape)} | " + " | ".join(cells)
                  + f" | {mean:.2f} | {changed} |")
            if changed and mean > best.get(shape, ("", 1.0))[1]:
                best[shape] = (name if name == overrides else f"{name} ({overrides})", mean)
    print()
    print("Best per shape (geometric mean over the ops, among the sets that change a kernel;")
    print("none: no such set beat the defaults).")
    print()
    for shape in shapes:
        name, mean = best.get(shape, ("none", 1.0))
        print(f"- {label(shape)}: {name}" + (f", {mean:.2f}x" if name != "none" else ""))


if __name__ == "__main__":
    main(sys.argv)
