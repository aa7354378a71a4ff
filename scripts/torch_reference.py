#!/usr/bin/env python3
"""PyTorch's side of the GPU comparison.

Times torch.softmax, torch.log_softmax and their backward kernels (each into an output allocated
once, as the bench's buffers are) and F.cross_entropy (forward and backward, the gradient with
respect to the logits) on the shapes of `wgpu-softmax bench`, each
repetition timed in turn with a device-to-device copy of the same bytes, which is the limit. Bytes
are counted as the bench counts them (read plus written: 2 matrices for softmax and log-softmax, 3
for the backward ops, 2 plus 8 bytes a row plus 4 for cross-entropy), and the records have the
bench's JSON fields, with device "torch".

    python3 scripts/torch_reference.py --json > torch.json          # CUDA when present
    python3 scripts/torch_reference.py --device cpu --shape 64x1000  # a quick look anywhere
    python3 scripts/torch_reference.py --shape 16x21x16384           # dim=1 of [N, C, S]

A shape NxCxS runs the ops along dim 1 of an [N, C, S] tensor, as `wgpu-softmax bench` does
(records: rows N * S lines of cols C, and inner S); cross-entropy there takes targets [N, S].

On CUDA the times come from CUDA events around a batch of calls back to back, after a tenth of
a second of warm-up, as the bench times a hardware GPU (timing "cuda-events"; `runs_per_sample`
says how many calls, and the time is per call); on the CPU from the wall clock around each call
(timing "wall-cpu").
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (16384, 1024), (65536, 128), (64, 262144), (4, 524288), (32, 10)]
OPS = ["softmax", "log-softmax", "softmax-backward", "log-softmax-backward", "cross-entropy"]


def bytes_moved(op, rows, cols):
    """Bytes read plus written by `op` on `rows` lines of `cols` elements."""
    matrix = rows * cols * 4
    if op in ("softmax", "log-softmax", "copy"):
        return 2 * matrix
    if op.endswith("backward"):
        return 3 * matrix
    return 2 * matrix + 8 * rows + 4


def shape(text):
    """(rows, cols, inner): ROWSxCOLS rows, or NxCxS, N * S lines of C along dim 1."""
    parts = text.split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS or NxCxS, got {text!r}")
    if len(parts) == 2:
        return int(parts[0]), int(parts[1]), 1
    n, c, s = map(int, parts)
    return n * s, c, s


def make_op(op, rows, cols, inner, device, generator):
    """A zero-argument callable running `op` once on fresh inputs of the shape: along the last
    axis of [rows, cols], or where `inner` is more than 1 along dim 1 of
    [rows / inner, cols, inner].

    Softmax, log-softmax and their backward kernels write into an output allocated once (ATen's
    `out=` forms of the kernels `torch.softmax` and the others call), as `wgpu-softmax bench`
    writes into buffers it allocated once: a fresh output per call would time the allocator too,
    which on a CPU means a page fault per page of the output. Cross-entropy is the autograd step
    a training loop runs, which allocates its gradient."""
    dims = (rows, cols) if inner == 1 else (rows // inner, cols, inner)
    dim = -1 if inner == 1 else 1
    x = torch.randn(*dims, device=device, generator=generator)
    out = torch.empty_like(x)
    if op == "softmax":
        return lambda: torch.ops.aten._softmax.out(x, dim, False, out=out)
    if op == "log-softmax":
        return lambda: torch.ops.aten._log_softmax.out(x, dim, False, out=out)
    if op in ("softmax-backward", "log-softmax-backward"):
        # The backward kernels themselves, on an output and an upstream gradient: what
        # `wgpu-softmax`'s backward ops compute.
        dy = torch.randn(*dims, device=device, generator=generator)
        if op == "softmax-backward":
            y = torch.softmax(x, dim=dim)
            return lambda: torch.ops.aten._softmax_backward_data.out(
                dy, y, dim, torch.float32, grad_input=out
            )
        y = torch.log_softmax(x, dim=dim)
        return lambda: torch.ops.aten._log_softmax_backward_data.out(
            dy, y, dim, torch.float32, out=out
        )
    if op == "cross-entropy":
        logits = x.clone().requires_grad_(True)
        target_dims = (rows,) if inner == 1 else (rows // inner, inner)
        targets = torch.randint(0, cols, target_dims, device=device, generator=generator)

        def step():
            logits.grad = None
            F.cross_entropy(logits, targets).backward()
            return logits.grad

        return step
    raise ValueError(op)


class Timer:
    """Times a callable in batches of runs back to back, as `wgpu-softmax bench` does on a
    hardware GPU: a tenth of a second of warm-up first (a GPU's clocks fall while it waits on
    short, lone kernels), then samples of at least 2 ms; each figure is per run."""

    WARM_UP = 0.1
    SAMPLE = 2e-3
    MAX_RUNS = 1000

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.name = "cuda-events" if self.cuda else "wall-cpu"

    def seconds(self, fn, runs=1):
        """Mean seconds of one of `runs` calls of `fn` back to back."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(runs):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / runs
        t0 = time.perf_counter()
        for _ in range(runs):
            fn()
        return (time.perf_counter() - t0) / runs

    def runs(self, one):
        if not self.cuda:
            return 1
        return max(1, min(self.MAX_RUNS, math.ceil(self.SAMPLE / max(one, 1e-9))))

    def calibrate(self, fn):
        """Warms `fn` up; returns the runs per sample."""
        t0 = time.perf_counter()
        runs = self.runs(self.seconds(fn))
        while self.cuda and time.perf_counter() - t0 < self.WARM_UP:
            runs = self.runs(self.seconds(fn, runs))
        return runs


def run(args):
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(7)
    timer = Timer(device)
    name = torch.cuda.get_device_name(device) if timer.cuda else "cpu"
    records = []
    for rows, cols, inner in args.shapes or [(r, c, 1) for r, c in SHAPES]:
        src = torch.randn(rows, cols, device=device, generator=generator)
        dst = torch.empty_like(src)
        copy = lambda: dst.copy_(src)  # noqa: E731
        ops = args.ops or OPS
        for op in ops:
            fn = make_op(op, rows, cols, inner, device, generator)
            op_runs = timer.calibrate(fn)
            copy_runs = timer.runs(timer.seconds(copy))
            op_times, copy_times = [], []
            for _ in range(args.repeats):
                copy_times.append(timer.seconds(copy, copy_runs))
                op_times.append(timer.seconds(fn, op_runs))
            seconds = statistics.median(op_times)
            limit = bytes_moved("copy", rows, cols) / statistics.median(copy_times) / 1e9
            gb_per_s = bytes_moved(op, rows, cols) / seconds / 1e9
            records.append({
                "op": op,
                "rows": rows,
                "cols": cols,
                "inner": inner,
                "device": "torch",
                "seconds": seconds,
                "gb_per_s": gb_per_s,
                "limit_gb_per_s": limit,
                "pct_of_limit": 100.0 * gb_per_s / limit,
                "timing": timer.name,
                "runs_per_sample": op_runs,
                "adapter": f"{name} (torch {torch.__version__})",
            })
            if not args.json:
                r = records[-1]
                label = f"{rows}x{cols}" if inner == 1 else f"{rows // inner}x{cols}x{inner}"
                print(f"{op:<22} {label:>15} {seconds * 1e3:10.3f} ms {gb_per_s:9.2f} GB/s"
                      f" {limit:9.2f} limit {r['pct_of_limit']:6.1f}%  {timer.name}")
            del fn
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", dest="ops", action="append", choices=OPS,
                        help="op to time (repeatable); default: all")
    parser.add_argument("--shape", dest="shapes", action="append", type=shape,
                        help="ROWSxCOLS or NxCxS (repeatable); default: the bench's shapes")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed repetitions per case, the median is reported (default 7)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print JSON records, not a table")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    run(args)


if __name__ == "__main__":
    main()
