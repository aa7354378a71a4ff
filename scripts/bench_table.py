#!/usr/bin/env python3
"""Builds the README's benchmark table from JSON records.

Reads files of `wgpu-softmax bench --json` and `scripts/torch_reference.py --json` records (several
rounds each), and prints a Markdown table: one row per op and shape, one column per device (each
GPU adapter and backend, the CPU path, torch), each cell the median over the rounds of the GB/s
and of the share of that record's limit. With torch records present, the GPU and CPU columns
each get a ratio to torch's GB/s on the same kind of device. The limits' medians and ranges over
the shapes of at least 2^20 elements go to stderr.

    python3 scripts/bench_table.py round_*.json torch_*.json
"""

import json
import re
import statistics
import sys
from collections import defaultdict

OPS = ["softmax", "log-softmax", "softmax-backward", "log-softmax-backward", "cross-entropy"]
NAMES = {"cross-entropy": "cross-entropy (loss + grad)"}
LIMIT_NAMES = {"gpu": "% copy", "torch-gpu": "% copy", "cpu": "% memcpy", "torch-cpu": "% copy"}
# Each of our columns is compared with torch on the same kind of device.
RIVAL = {"gpu": "torch-gpu", "cpu": "torch-cpu"}
KINDS = ["gpu", "torch-gpu", "cpu", "torch-cpu"]


def column(record):
    """The table column a record belongs to, and the kind of limit it was measured against."""
    device = record["device"]
    if device == "gpu":
        adapter = record.get("adapter", "GPU")
        backend = re.search(r"\((Vulkan|Gl|Metal|Dx12|BrowserWebGpu),", adapter)
        name = adapter.split(" (")[0]
        if backend:
            # Mesa's Vulkan driver names itself after the GL one it is built on.
            if name == "llvmpipe" and backend.group(1) == "Vulkan":
                name = "lavapipe"
            name = f"{name} ({backend.group(1)})"
        return f"{name} GB/s", "gpu"
    if device == "cpu":
        return "CPU f32 GB/s", "cpu"
    if record["timing"] == "cuda-events":
        return "torch GPU GB/s", "torch-gpu"
    return "torch CPU GB/s", "torch-cpu"


def main(paths):
    if not paths:
        sys.exit(__doc__)
    cells = defaultdict(list)
    limits = defaultdict(list)
    columns = {}
    shapes = []
    for path in paths:
        with open(path) as f:
            for r in json.load(f):
                label, kind = column(r)
                columns.setdefault(label, kind)
                # Lines along the softmax axis, their length, and the distance between a
                # line's elements (1: rows; records without it, torch's, are rows).
                shape = (r["rows"], r["cols"], r.get("inner", 1))
                if shape not in shapes:
                    shapes.append(shape)
                cells[(r["op"], shape, label)].append((r["gb_per_s"], r["pct_of_limit"]))
                if r["rows"] * r["cols"] >= 1 << 20:
                    limits[label].append(r["limit_gb_per_s"])
    order = sorted(columns, key=lambda c: KINDS.index(columns[c]))
    rival = {k: next((c for c in order if columns[c] == k), None) for k in RIVAL.values()}

    def rival_of(c):
        return rival.get(RIVAL.get(columns[c]))

    header = ["op", "shape"]
    for c in order:
        header.append(f"{c} ({LIMIT_NAMES[columns[c]]})")
        if rival_of(c):
            header.append(f"{c.removesuffix(' GB/s')} / torch")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    median = statistics.median
    for op in OPS:
        for shape in shapes:
            if not any(cells.get((op, shape, c)) for c in order):
                continue
            rows, cols, inner = shape
            label = f"{rows}x{cols}" if inner == 1 else f"{rows // inner}x{cols}x{inner}"
            row = [NAMES.get(op, op), label]
            for c in order:
                v = cells.get((op, shape, c))
                if not v:
                    row.append("-")
                else:
                    g, p = median(x[0] for x in v), median(x[1] for x in v)
                    row.append(("%.2f" if g < 10 else "%.1f") % g + " (%.0f%%)" % p)
                if rival_of(c):
                    t = cells.get((op, shape, rival_of(c)))
                    if v and t:
                        ratio = median(x[0] for x in v) / median(x[0] for x in t)
                        row.append("%.2f" % ratio)
                    else:
                        row.append("-")
            print("| " + " | ".join(row) + " |")
    for c in order:
        v = limits.get(c)
        if v:
            print(f"{c}: limit median {median(v):.1f} GB/s, {min(v):.1f} to {max(v):.1f}",
                  file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
