//! The runner binary end to end: `apply` on `.npy` files, its errors and exit codes; `bench`,
//! and the per-dispatch timing it is built on.

mod common;

use std::path::{Path, PathBuf};

use common::files::{assert_one_error_line, batch_dir, read, runner, write, Dir};
use common::{context, logits, tuned};
use wgpu_softmax::bench::{BenchOp, GpuBench};
use wgpu_softmax::cpu::reference;
use wgpu_softmax::{
    AxisLayout, CrossEntropyOptions, Error, GradOutput, Reduction, Targets, Tolerance, Tuning,
};

#[test]
fn apply_softmax_over_the_last_axis_of_any_rank() {
    if context().is_none() {
        return;
    }
    let dir = Dir::new("softmax");
    let x = logits(2 * 3 * 5, 7, 2.0, 1);
    write(&dir.path("x.npy"), &[2, 3, 5, 7], &x);
    for (op, want) in [
        ("softmax", reference::softmax(&x, 7).unwrap()),
        ("log-softmax", reference::log_softmax(&x, 7).unwrap()),
    ] {
        let out = dir.path(&format!("{op}.npy"));
        let status = runner()
            .args(["apply", op, "--input"])
            .arg(dir.path("x.npy"))
            .arg("--output")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "{op}");
        let (shape, got) = read(&out);
        assert_eq!(shape, [2, 3, 5, 7]);
        assert!(Tolerance::LOG_SOFTMAX.compare(&got, &want).passed(), "{op}");
    }
    // An empty batch gives an empty output of the same shape.
    write::<f32>(&dir.path("empty.npy"), &[0, 4], &[]);
    let status = runner()
        .args(["apply", "softmax", "--input"])
        .arg(dir.path("empty.npy"))
        .arg("--output")
        .arg(dir.path("empty-out.npy"))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(read(&dir.path("empty-out.npy")), (vec![0, 4], vec![]));
}

/// `--axis` picks the axis (negative from the end), as PyTorch's `dim`: the result is the row
/// op's on the lines along it; an empty array is its own result whatever the axis.
#[test]
fn apply_along_any_axis() {
    if context().is_none() {
        return;
    }
    let dir = Dir::new("along");
    let shape = [2u64, 3, 5, 7];
    let layout = AxisLayout::new(&shape.map(|d| d as usize), 1).unwrap();
    let x = logits(layout.numel(), 1, 2.0, 5);
    let dy = logits(layout.numel(), 1, 1.0, 6);
    write(&dir.path("x.npy"), &shape, &x);
    write(&dir.path("dy.npy"), &shape, &dy);
    let along = |op: fn(&[f32], &[f32], usize) -> Vec<f64>, inputs: [&[f32]; 2]| {
        let [a, b] = inputs.map(|v| layout.to_rows(v).unwrap());
        layout.from_rows(&op(&a, &b, layout.len())).unwrap()
    };
    let cases: [(&str, &str, Option<&str>, Vec<f64>); 3] = [
        (
            "softmax",
            "1",
            None,
            along(|x, _, c| reference::softmax(x, c).unwrap(), [&x, &dy]),
        ),
        (
            "log-softmax",
            "-3",
            None,
            along(|x, _, c| reference::log_softmax(x, c).unwrap(), [&x, &dy]),
        ),
        (
            "log-softmax-backward",
            "1",
            Some("dy.npy"),
            along(
                |y, g, c| reference::log_softmax_backward(y, g, c).unwrap(),
                [&x, &dy],
            ),
        ),
    ];
    for (op, axis, grad, want) in cases {
        let out = dir.path(&format!("{op}.npy"));
        let mut command = runner();
        command
            .args(["apply", op, "--axis", axis, "--input"])
            .arg(dir.path("x.npy"))
            .arg("--output")
            .arg(&out);
        if let Some(grad) = grad {
            command.arg("--grad").arg(dir.path(grad));
        }
        assert!(command.status().unwrap().success(), "{op}");
        let (got_shape, got) = read(&out);
        assert_eq!(got_shape, shape);
        assert!(
            Tolerance::LOG_SOFTMAX.compare(&got, &want).passed(),
            "{op} --axis {axis}"
        );
    }
    write::<f32>(&dir.path("gap.npy"), &[2, 0, 3], &[]);
    let status = runner()
        .args(["apply", "softmax", "--axis", "1", "--input"])
        .arg(dir.path("gap.npy"))
        .arg("--output")
        .arg(dir.path("gap-out.npy"))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(read(&dir.path("gap-out.npy")), (vec![2, 0, 3], vec![]));
}

#[test]
fn apply_backward_ops() {
    if context().is_none() {
        return;
    }
    let dir = Dir::new("backward");
    let y: Vec<f32> = reference::softmax(&logits(6, 9, 1.0, 2), 9)
        .unwrap()
        .iter()
        .map(|&v| v as f32)
        .collect();
    let dy = logits(6, 9, 1.0, 3);
    write(&dir.path("y.npy"), &[6, 9], &y);
    write(&dir.path("dy.npy"), &[6, 9], &dy);
    let status = runner()
        .args(["apply", "softmax-backward", "--input"])
        .arg(dir.path("y.npy"))
        .arg("--grad")
        .arg(dir.path("dy.npy"))
        .arg("--output")
        .arg(dir.path("dx.npy"))
        .status()
        .unwrap();
    assert!(status.success());
    let (_, got) = read(&dir.path("dx.npy"));
    let want = reference::softmax_backward(&y, &dy, 9).unwrap();
    assert!(Tolerance::SOFTMAX.compare(&got, &want).passed());
}

/// Classes on axis 1: logits [N, C, d] and targets [N, d], as in a segmentation loss; and the
/// same classes last (`--axis -1`, logits [N, d, C]).
#[test]
fn apply_cross_entropy_with_classes_on_axis_one() {
    if context().is_none() {
        return;
    }
    let dir = Dir::new("xent");
    let (n, c, d) = (3, 4, 5);
    let x = logits(n * c * d, 1, 1.5, 4);
    let t: Vec<i64> = (0..n * d)
        .map(|i| if i == 7 { -100 } else { (i % c) as i64 })
        .collect();
    write(&dir.path("logits.npy"), &[n as u64, c as u64, d as u64], &x);
    write(&dir.path("t.npy"), &[n as u64, d as u64], &t);
    // `apply cross-entropy` of `input` and t.npy with `extra` flags, unreduced, smoothed, into
    // `loss` and `grad`.
    let apply = |input: &str, extra: &[&str], loss: &str, grad: &str| {
        let output = runner()
            .args(["apply", "cross-entropy", "--input"])
            .arg(dir.path(input))
            .arg("--targets")
            .arg(dir.path("t.npy"))
            .args(extra)
            .args([
                "--reduction",
                "none",
                "--label-smoothing",
                "0.1",
                "--output",
            ])
            .arg(dir.path(loss))
            .arg("--grad-output")
            .arg(dir.path(grad))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    apply("logits.npy", &[], "loss.npy", "grad.npy");
    // The reference on rows gathered by hand: row (n, s) holds x[n, :, s].
    let mut rows = Vec::new();
    for ni in 0..n {
        for s in 0..d {
            rows.extend((0..c).map(|ci| x[(ni * c + ci) * d + s]));
        }
    }
    let options = CrossEntropyOptions {
        reduction: Reduction::None,
        label_smoothing: 0.1,
        ..Default::default()
    };
    let want = reference::cross_entropy(&rows, c, Targets::Indices(&t), &options, GradOutput::One)
        .unwrap();
    let (shape, loss) = read(&dir.path("loss.npy"));
    assert_eq!(shape, [n as u64, d as u64]);
    assert!(Tolerance::LOG_SOFTMAX.compare(&loss, &want.loss).passed());
    let (shape, grad) = read(&dir.path("grad.npy"));
    assert_eq!(shape, [n as u64, c as u64, d as u64]);
    for ni in 0..n {
        for s in 0..d {
            for ci in 0..c {
                let got = grad[(ni * c + ci) * d + s];
                let expected = want.grad[(ni * d + s) * c + ci];
                assert!(
                    (f64::from(got) - expected).abs() < 1e-6,
                    "grad[{ni},{ci},{s}]"
                );
            }
        }
    }
    // The same logits with the classes last: the rows the reference took.
    write(
        &dir.path("last.npy"),
        &[n as u64, d as u64, c as u64],
        &rows,
    );
    apply(
        "last.npy",
        &["--axis", "-1"],
        "loss_last.npy",
        "grad_last.npy",
    );
    let (shape, loss) = read(&dir.path("loss_last.npy"));
    assert_eq!(shape, [n as u64, d as u64]);
    assert!(Tolerance::LOG_SOFTMAX.compare(&loss, &want.loss).passed());
    let (shape, grad) = read(&dir.path("grad_last.npy"));
    assert_eq!(shape, [n as u64, d as u64, c as u64]);
    assert!(Tolerance::SOFTMAX.compare(&grad, &want.grad).passed());
}

#[test]
fn apply_failures_exit_2_and_leave_no_output() {
    if context().is_none() {
        return;
    }
    let dir = Dir::new("errors");
    write(&dir.path("ints.npy"), &[2, 2], &[1i64, 2, 3, 4]);
    write(&dir.path("x.npy"), &[2, 3], &[0.0f32; 6]);
    write(&dir.path("bad-t.npy"), &[2], &[0i64, 9]);
    std::fs::write(dir.path("garbage.npy"), b"\x93NUMPY\x01\x00garbage").unwrap();
    let out = dir.path("out.npy");
    let cases: Vec<(Vec<&str>, Vec<PathBuf>, &str)> = vec![
        (
            vec!["apply", "softmax", "--input"],
            vec![dir.path("missing.npy")],
            "missing.npy",
        ),
        (
            vec!["apply", "softmax", "--input"],
            vec![dir.path("garbage.npy")],
            "garbage.npy",
        ),
        (
            vec!["apply", "softmax", "--input"],
            vec![dir.path("ints.npy")],
            "int64",
        ),
        (
            vec!["apply", "cross-entropy", "--input"],
            vec![dir.path("x.npy"), "--targets".into(), dir.path("bad-t.npy")],
            "bad-t.npy: target 9 at index 1",
        ),
        (
            vec!["apply", "softmax-backward", "--input"],
            vec![dir.path("x.npy")],
            "--grad",
        ),
    ];
    for (args, paths, needle) in cases {
        let output = runner()
            .args(&args)
            .args(&paths)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert_one_error_line(&output, &format!("{args:?}"), needle);
        assert!(!out.exists(), "{args:?} left an output file");
    }
}

#[test]
fn bench_prints_a_json_record_per_op_shape_and_device() {
    if context().is_none() {
        return;
    }
    let output = runner()
        .args([
            "bench",
            "--op",
            "softmax",
            "--op",
            "cross-entropy",
            "--shape",
            "8x16",
            "--shape",
            "3x7",
            "--repeats",
            "1",
            "--json",
            "--tune",
            "vector=1",
        ])
        .output()
        .unwrap();
    let records = json_records(&output);
    assert_eq!(records.len(), 2 * 2 * 2, "{records:?}");
    for record in &records {
        let field = |name: &str| {
            record
                .get(name)
                .unwrap_or_else(|| panic!("{name}: {record}"))
        };
        assert!(["softmax", "cross-entropy"].contains(&field("op").as_str().unwrap()));
        assert!([8, 3].contains(&field("rows").as_u64().unwrap()));
        assert!([16, 7].contains(&field("cols").as_u64().unwrap()));
        let device = field("device").as_str().unwrap();
        let timing = field("timing").as_str().unwrap();
        let kernel = field("kernel").as_str().unwrap();
        match device {
            "gpu" => {
                assert!(
                    ["gpu-timestamps", "wall-submit-to-completion"].contains(&timing),
                    "{record}"
                );
                // `--tune vector=1`: scalar kernels only.
                assert!(kernel.ends_with(", scalar"), "{record}");
                assert!(kernel.contains(" per row, "), "{record}");
            }
            "cpu" => {
                assert_eq!(timing, "wall-cpu");
                assert!(
                    kernel.starts_with("f32 ") && kernel.ends_with(" threads"),
                    "{record}"
                );
            }
            other => panic!("device {other}"),
        }
        // Batched samples on hardware GPUs only: the CPU path and software adapters time one
        // run per sample.
        let runs = field("runs_per_sample").as_u64().unwrap();
        assert!((1..=1000).contains(&runs), "{record}");
        if device == "cpu" || !is_hardware_gpu(field("adapter").as_str().unwrap_or_default()) {
            assert_eq!(runs, 1, "{record}");
        }
        let gb = field("gb_per_s").as_f64().unwrap();
        assert!(gb.is_finite() && gb > 0.0, "{record}");
        assert!(field("pct_of_limit").as_f64().unwrap() > 0.0, "{record}");
    }
    // The README's table is built from these records by scripts/bench_table.py.
    let dir = Dir::new("bench");
    // NxCxS: the ops along axis 1 of [N, C, S] (cross-entropy's classes, a target per line).
    let along = runner()
        .args(["bench", "--op", "softmax", "--op", "log-softmax-backward"])
        .args(["--op", "cross-entropy"])
        .args([
            "--shape",
            "2x21x64",
            "--shape",
            "3x40x5",
            "--repeats",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    let along_records = json_records(&along);
    assert_eq!(along_records.len(), 3 * 2 * 2, "{along_records:?}");
    for record in &along_records {
        let (rows, cols, inner) = (&record["rows"], &record["cols"], &record["inner"]);
        let kernel = record["kernel"].as_str().unwrap();
        let shape = (rows.as_u64(), cols.as_u64(), inner.as_u64());
        assert!(
            [
                (Some(128), Some(21), Some(64)),
                (Some(15), Some(40), Some(5))
            ]
            .contains(&shape),
            "{record}"
        );
        let cross_entropy = record["op"] == "cross-entropy";
        match record["device"].as_str().unwrap() {
            "gpu" if cross_entropy => {
                assert!(kernel.starts_with("invocation per line, "), "{record}")
            }
            "gpu" => assert!(kernel.starts_with("invocation per "), "{record}"),
            _ => assert!(kernel.ends_with("lines side by side"), "{record}"),
        }
    }
    let along_json = dir.path("along.json");
    std::fs::write(&along_json, &along.stdout).unwrap();
    let json = dir.path("round.json");
    std::fs::write(&json, &output.stdout).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_table.py");
    let table = std::process::Command::new("python3")
        .arg(script)
        .arg(&json)
        .arg(&along_json)
        .output()
        .expect("python3 runs scripts/bench_table.py");
    assert!(table.status.success(), "{table:?}");
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("CPU f32 GB/s (% memcpy)"), "{table}");
    for row in [
        "| softmax | 8x16 |",
        "| softmax | 3x7 |",
        "| softmax | 2x21x64 |",
        "| log-softmax-backward | 3x40x5 |",
        "| cross-entropy (loss + grad) | 8x16 |",
        "| cross-entropy (loss + grad) | 2x21x64 |",
    ] {
        assert!(table.contains(row), "{row}: {table}");
    }
    assert_eq!(table.lines().count(), 2 + 4 + 6, "{table}");
    // A tuning field that does not exist is refused with exit code 2.
    let output = runner()
        .args(["bench", "--shape", "3x7", "--tune", "no_such_field=1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

/// `scripts/gpu_tune.sh` end to end on a tiny shape: the defaults and three override sets, each a
/// row per shape in the summary, then the best set per shape.
#[test]
fn tuning_sweep_ranks_override_sets_against_the_defaults() {
    if context().is_none() {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = Dir::new("tune");
    let out = dir.path("out");
    let output = std::process::Command::new("bash")
        .arg(root.join("scripts/gpu_tune.sh"))
        .env("OUT", &out)
        .env("WGPU_SOFTMAX", env!("CARGO_BIN_EXE_wgpu-softmax"))
        .env(
            "SETS",
            "vector=1 subgroups=0 split_group_bytes=8MiB axis_vec4_max_inner=0",
        )
        .env("SHAPES", "3x8 2x5x4")
        .env("ROUNDS", "1")
        .env("REPEATS", "1")
        .output()
        .expect("bash runs scripts/gpu_tune.sh");
    assert!(output.status.success(), "{output:?}");
    let table = std::fs::read_to_string(out.join("tune.md")).unwrap();
    assert_eq!(table, String::from_utf8(output.stdout).unwrap());
    for line in [
        "| softmax | ",
        "| cross-entropy | ",
        "| vector=1 | 3x8 | ",
        "| subgroups=0 | 3x8 | ",
        "| split_group_bytes=8MiB | 3x8 | ",
        "| axis_vec4_max_inner=0 | 2x5x4 | ",
        "- 3x8: softmax: ",
        "- 2x5x4: softmax: invocation per 4 lines",
        "- 3x8: ",
    ] {
        assert!(table.contains(line), "{line}: {table}");
    }
    // The defaults, then each set: the five ops on 3x8 and along an axis on 2x5x4.
    for index in 1..=5 {
        let records: Vec<serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("set_{index}_r1.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(records.len(), 10, "set {index}: {records:?}");
    }
}

/// `apply softmax --input x.npy --output <out>`: its output.
fn softmax_to(x: &Path, out: &Path) -> std::process::Output {
    runner()
        .args(["apply", "softmax", "--input"])
        .arg(x)
        .arg("--output")
        .arg(out)
        .output()
        .unwrap()
}

/// `--output` names where the data goes, not a directory entry to replace: a symbolic link is
/// followed, and a FIFO or character device is written into and stays what it was.
#[cfg(target_os = "linux")]
#[test]
fn apply_output_writes_where_the_path_points() {
    use std::io::Read;
    use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
    if context().is_none() {
        return;
    }
    let dir = batch_dir("output-kinds");
    let x = dir.path("x.npy");
    let plain = dir.path("plain.npy");
    assert!(softmax_to(&x, &plain).status.success());
    let expected = std::fs::read(&plain).unwrap();

    // A link to a file not there yet, then to the file the first run made.
    std::fs::create_dir(dir.path("real")).unwrap();
    let link = dir.path("link.npy");
    symlink("real/y.npy", &link).unwrap();
    for _ in 0..2 {
        let output = softmax_to(&x, &link);
        assert!(output.status.success(), "{output:?}");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(dir.path("real/y.npy")).unwrap(), expected);
    }

    // Opened for reading and writing, a FIFO has a reader at once (Linux), so the runner's
    // write does not wait; it fits in the pipe's buffer.
    let fifo = dir.path("fifo");
    if std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        let output = softmax_to(&x, &fifo);
        assert!(output.status.success(), "{output:?}");
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        let mut got = vec![0; expected.len()];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(got, expected);
    } else {
        eprintln!("SKIPPED the FIFO case: mkfifo failed");
    }

    // A character device. Renaming over one (the fault this guards against) needs write
    // permission on its directory: an unprivileged user cannot do it in /dev, so /dev/null
    // itself is safe to name; a privileged one gets a node of its own, the same device.
    let privileged = std::fs::metadata(&x).unwrap().uid() == 0;
    let device = if privileged {
        let node = dir.path("null");
        let made = std::process::Command::new("mknod")
            .arg(&node)
            .args(["c", "1", "3"])
            .status()
            .is_ok_and(|s| s.success());
        // A file system mounted nodev refuses to open device nodes.
        (made && std::fs::OpenOptions::new().write(true).open(&node).is_ok()).then_some(node)
    } else {
        Some(PathBuf::from("/dev/null"))
    };
    match device.filter(|d| std::fs::metadata(d).is_ok_and(|m| m.file_type().is_char_device())) {
        Some(device) => {
            let output = softmax_to(&x, &device);
            assert!(output.status.success(), "{output:?}");
            assert!(std::fs::metadata(&device)
                .unwrap()
                .file_type()
                .is_char_device());
        }
        None => eprintln!("SKIPPED the character device case: no device node to use"),
    }
}

/// Replacing an existing output keeps its permissions, and an output the user may not write is
/// refused (a privileged user may write it, and it stays read-only).
#[cfg(unix)]
#[test]
fn apply_output_keeps_permissions_and_refuses_read_only_files() {
    use std::os::unix::fs::PermissionsExt;
    if context().is_none() {
        return;
    }
    let dir = batch_dir("output-modes");
    let x = dir.path("x.npy");
    let out = dir.path("y.npy");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let set_mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    };

    // A mode no umask gives a new file.
    std::fs::write(&out, b"old").unwrap();
    set_mode(&out, 0o604);
    let output = softmax_to(&x, &out);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(mode(&out), 0o604);
    assert_eq!(read(&out).0, [2, 3]);

    std::fs::write(&out, b"old").unwrap();
    set_mode(&out, 0o444);
    let writable = std::fs::OpenOptions::new().write(true).open(&out).is_ok();
    let output = softmax_to(&x, &out);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(mode(&out), 0o444, "{stderr}");
    if writable {
        assert!(output.status.success(), "{stderr}");
        assert_eq!(read(&out).0, [2, 3]);
    } else {
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("cannot write") && stderr.contains("y.npy"),
            "{stderr}"
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
    }
}

/// Tunings that split rows of 1024 columns into chunks of 256: `(two passes, one pass)`; the
/// one pass takes a workgroup of 64 per chunk, one vec4 per invocation.
fn split_tunings() -> (Tuning, Tuning) {
    let two = Tuning {
        split_min_cols: 64,
        split_max_rows: 512,
        split_chunk: 256,
        ..Tuning::SOFTWARE
    };
    let one = Tuning {
        split_team: 2,
        row_workgroup: 64,
        split_wait: 1000,
        loss_split_wait: 1000,
        ..two
    };
    (two, one)
}

/// `bench --dispatches` times each dispatch of a run in a pass of its own: the two passes of a
/// split row, or the one pass and the pass finishing what it left, then cross-entropy's passes
/// over the batch.
#[test]
fn bench_times_each_dispatch_in_a_pass_of_its_own() {
    let Some(ctx) = context() else {
        return;
    };
    let (two, one) = split_tunings();
    for (tuning, softmax, loss) in [
        (
            two,
            ["split_partials4", "split_normalize4"],
            ["split_partials4", "split_finish4"],
        ),
        (
            one,
            ["split_fused4", "split_rest4"],
            ["split_fused4", "split_rest4"],
        ),
    ] {
        let mut args: Vec<String> =
            "bench --op softmax --op cross-entropy --shape 4x1024 --repeats 2 --no-cpu --json \
             --dispatches"
                .split_whitespace()
                .map(String::from)
                .collect();
        for (field, value) in [
            ("split_min_cols", tuning.split_min_cols),
            ("split_chunk", tuning.split_chunk),
            ("split_team", tuning.split_team),
            ("row_workgroup", tuning.row_workgroup),
            ("split_wait", tuning.split_wait),
            ("loss_split_wait", tuning.loss_split_wait),
        ] {
            args.extend(["--tune".to_string(), format!("{field}={value}")]);
        }
        let output = runner().args(&args).output().unwrap();
        if !ctx
            .device()
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            assert_one_error_line(&output, "--dispatches", "needs timestamp queries");
            return;
        }
        let records = json_records(&output);
        assert_eq!(records.len(), 2, "{records:?}");
        for record in &records {
            let dispatches = record["dispatches"].as_array().expect("dispatches");
            let entries: Vec<&str> = dispatches
                .iter()
                .map(|d| d["entry"].as_str().unwrap())
                .collect();
            let mut total = 0.0;
            for d in dispatches {
                let (seconds, pct) = (d["seconds"].as_f64().unwrap(), d["pct_of_op"].as_f64());
                assert!(seconds.is_finite() && seconds >= 0.0, "{record}");
                assert!(pct.is_some_and(|p| p.is_finite() && p >= 0.0), "{record}");
                total += seconds;
            }
            assert!(total > 0.0, "{record}");
            match record["op"].as_str().unwrap() {
                "softmax" => assert_eq!(entries, softmax, "{record}"),
                _ => {
                    // The loss's mean is added up over the batch after the row passes.
                    assert_eq!(entries[..2], loss, "{record}");
                    assert!(
                        entries[2..].iter().all(|e| e.starts_with("batch_")),
                        "{record}"
                    );
                }
            }
        }
    }
    // Without --dispatches, no record has them.
    let args = [
        "bench",
        "--op",
        "softmax",
        "--shape",
        "4x8",
        "--repeats",
        "1",
        "--json",
    ];
    let records = json_records(&runner().args(args).output().unwrap());
    assert!(
        records.iter().all(|r| r.get("dispatches").is_none()),
        "{records:?}"
    );
}

/// `GpuBench::run_dispatches`: the plan's dispatches of one run, however many runs are timed;
/// more than it has room for is an error that leaves it usable.
#[test]
fn dispatch_times_follow_the_plan_of_one_run() {
    let Some(base) = context() else {
        return;
    };
    if !base
        .device()
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY)
    {
        let bench = GpuBench::new(base, BenchOp::Softmax, 4, 8).unwrap();
        assert!(matches!(bench.run_dispatches(1), Err(Error::Internal(_))));
        return;
    }
    let (two, one) = split_tunings();
    let alone = Tuning {
        split_alone: 1,
        ..one
    };
    for (tuning, entries) in [
        (two, &["split_partials4", "split_normalize4"][..]),
        (one, &["split_fused4", "split_rest4"]),
        (alone, &["split_fused4"]),
    ] {
        let ctx = tuned(base, tuning);
        let bench = GpuBench::new(&ctx, BenchOp::LogSoftmax, 4, 1024).unwrap();
        for runs in [1, 5] {
            let times = bench.run_dispatches(runs).unwrap();
            let got: Vec<&str> = times.iter().map(|t| t.entry).collect();
            assert_eq!(got, entries, "{tuning:?}, {runs} runs");
        }
    }
    let bench = GpuBench::new(base, BenchOp::Copy, 4, 8).unwrap();
    assert_eq!(bench.run_dispatches(1).unwrap().len(), 1);
    let error = bench
        .run_dispatches(GpuBench::MAX_TIMED_DISPATCHES + 1)
        .unwrap_err();
    assert!(
        matches!(error, Error::Internal(ref m) if m.contains("room")),
        "{error:?}"
    );
    let times = bench
        .run_dispatches(GpuBench::MAX_TIMED_DISPATCHES)
        .unwrap();
    assert_eq!(times.iter().map(|t| t.entry).collect::<Vec<_>>(), ["copy"]);
}

/// The records of a `bench --json` that succeeded.
fn json_records(output: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("a JSON array of records")
}

/// Whether a bench record's `adapter` (as `Context::describe` writes it) is a hardware GPU rather
/// than a software adapter (device type `Cpu`).
fn is_hardware_gpu(adapter: &str) -> bool {
    !adapter.contains(", Cpu, ")
}

/// Where no adapter exists (`WGPU_BACKEND=noop` finds none on any machine), `check` checks the
/// CPU path against the reference and `apply` runs on it, each saying so on stderr; an adapter
/// name that matches nothing stays an error, since it says a GPU was meant.
#[test]
fn without_an_adapter_check_and_apply_run_on_the_cpu() {
    let no_adapter = || {
        let mut command = runner();
        command
            .env("WGPU_BACKEND", "noop")
            .env_remove("WGPU_ADAPTER_NAME");
        command
    };
    let output = no_adapter().arg("check").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("no GPU adapter; running on the CPU f32 path"),
        "{stderr}"
    );
    assert!(
        stdout.starts_with("adapter: none; checking the CPU f32 path"),
        "{stdout}"
    );
    assert!(stdout.contains("all 87 cases passed"), "{stdout}");
    let softmax_line = stdout
        .lines()
        .find(|line| line.starts_with("softmax ") && line.contains("4096x1000"))
        .unwrap_or_else(|| panic!("no softmax 4096x1000 line: {stdout}"));
    assert_eq!(
        softmax_line.split_whitespace().nth(4),
        Some("-"),
        "no GPU time without a GPU: {softmax_line}"
    );

    let dir = Dir::new("no-adapter");
    let x = logits(4 * 3, 11, 2.0, 9);
    write(&dir.path("x.npy"), &[4, 3, 11], &x);
    let output = no_adapter()
        .args(["apply", "log-softmax", "--input"])
        .arg(dir.path("x.npy"))
        .arg("--output")
        .arg(dir.path("y.npy"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let (shape, got) = read(&dir.path("y.npy"));
    assert_eq!(shape, [4, 3, 11]);
    let want = reference::log_softmax(&x, 11).unwrap();
    let cmp = Tolerance::LOG_SOFTMAX.compare(&got, &want);
    assert!(cmp.passed(), "{cmp:?}");

    let output = no_adapter()
        .env("WGPU_ADAPTER_NAME", "zzz-no-such-adapter")
        .args(["apply", "softmax", "--input"])
        .arg(dir.path("x.npy"))
        .arg("--output")
        .arg(dir.path("z.npy"))
        .output()
        .unwrap();
    assert_one_error_line(
        &output,
        "a name that matches nothing",
        "zzz-no-such-adapter",
    );
    assert!(!dir.path("z.npy").exists());
}
