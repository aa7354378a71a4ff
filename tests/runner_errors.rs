//! Every failure of `apply` that the library can report, and the runner's own checks: exit code
//! 2, one line on stderr naming the problem, and no output file left behind (not even the loss
//! when only the gradient could not be written).

mod common;

use std::path::Path;

use common::context;
use common::files::{assert_one_error_line, batch_dir, runner, write, Dir};

#[test]
fn every_apply_failure_is_one_line_exit_2_and_no_output() {
    if context().is_none() {
        return;
    }
    let dir = batch_dir("runner-errors");
    write(&dir.path("x3.npy"), &[2, 3, 2], &[0.0f32; 12]);
    write(&dir.path("vec.npy"), &[3], &[0.0f32; 3]);
    write(&dir.path("dy-wrong.npy"), &[3, 2], &[0.0f32; 6]);
    write(&dir.path("t-i32-bad.npy"), &[2], &[0i32, -7]);
    write(&dir.path("t-short.npy"), &[1], &[0i64]);
    write(&dir.path("p-wrong.npy"), &[2, 2], &[0.5f32; 4]);
    write(&dir.path("w-wrong.npy"), &[2], &[1.0f32; 2]);
    write(&dir.path("t-f64.npy"), &[2], &[0.0f64, 1.0]);
    let out = dir.arg("out.npy");
    let grad = dir.arg("grad.npy");
    let missing_dir = dir.path("no-such-dir").join("g.npy").display().to_string();
    let xent = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["apply", "cross-entropy", "--input"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(dir.arg("x.npy"));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let t = dir.arg("t.npy");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "apply".into(),
                "softmax-backward".into(),
                "--input".into(),
                dir.arg("x.npy"),
                "--grad".into(),
                dir.arg("dy-wrong.npy"),
            ],
            "must match",
        ),
        (
            vec![
                "apply".into(),
                "log-softmax-backward".into(),
                "--input".into(),
                dir.arg("x.npy"),
                "--grad".into(),
                dir.arg("missing.npy"),
            ],
            "missing.npy",
        ),
        (xent(&[]), "--targets"),
        (
            xent(&["--targets", &dir.arg("t-i32-bad.npy")]),
            "t-i32-bad.npy: target -7 at index 1",
        ),
        (xent(&["--targets", &dir.arg("t-short.npy")]), "t-short.npy"),
        (xent(&["--targets", &dir.arg("p-wrong.npy")]), "p-wrong.npy"),
        (xent(&["--targets", &dir.arg("t-f64.npy")]), "t-f64.npy"),
        (
            xent(&["--targets", &t, "--weight", &dir.arg("w-wrong.npy")]),
            "weight",
        ),
        (
            xent(&["--targets", &t, "--label-smoothing", "2"]),
            "--label-smoothing",
        ),
        (
            xent(&["--targets", &t, "--label-smoothing", "NaN"]),
            "--label-smoothing",
        ),
        (
            vec![
                "apply".into(),
                "cross-entropy".into(),
                "--input".into(),
                dir.arg("vec.npy"),
                "--targets".into(),
                t.clone(),
            ],
            "[N, C]",
        ),
        (
            vec![
                "apply".into(),
                "cross-entropy".into(),
                "--input".into(),
                dir.arg("x3.npy"),
                "--targets".into(),
                t.clone(),
            ],
            "shape",
        ),
        // The loss could be written, the gradient cannot: neither may remain.
        (
            xent(&["--targets", &t, "--grad-output", &missing_dir]),
            "no-such-dir",
        ),
    ];
    for (args, needle) in cases {
        let output = runner()
            .args(&args)
            .args(["--output", &out])
            .output()
            .unwrap();
        assert_one_error_line(&output, &format!("{args:?}"), needle);
        assert!(!Path::new(&out).exists(), "{args:?} left {out}");
        assert!(!Path::new(&grad).exists(), "{args:?} left {grad}");
    }
}

/// Runs `args`, expecting exit code 2 and one line of ours on stderr containing `needle`.
fn fails_with(args: &[String], needle: &str) {
    let output = runner().args(args).output().unwrap();
    assert_one_error_line(&output, &format!("{args:?}"), needle);
}

/// `apply cross-entropy` on the batch of [`batch_dir`], then `extra`.
fn cross_entropy_args(dir: &Dir, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "apply".to_owned(),
        "cross-entropy".to_owned(),
        "--input".to_owned(),
        dir.arg("x.npy"),
        "--targets".to_owned(),
        dir.arg("t.npy"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Cross-entropy writes two files: when the second cannot be written, the first keeps its old
/// contents; and the two may not be one file.
#[test]
fn cross_entropy_outputs_are_replaced_together_or_not_at_all() {
    if context().is_none() {
        return;
    }
    let dir = batch_dir("runner-two-outputs");
    let loss = dir.path("loss.npy");
    std::fs::write(&loss, b"old loss").unwrap();
    std::fs::create_dir(dir.path("grad-dir")).unwrap();
    let xent = |output: &str, grad_output: &str| {
        cross_entropy_args(&dir, &["--output", output, "--grad-output", grad_output])
    };

    fails_with(
        &xent(&dir.arg("loss.npy"), &dir.arg("grad-dir")),
        "grad-dir",
    );
    assert_eq!(std::fs::read(&loss).unwrap(), b"old loss");
    assert_eq!(std::fs::read_dir(dir.path("grad-dir")).unwrap().count(), 0);

    // The same file spelt twice, existing or not, directly or through a link.
    let other = dir.path("sub").join("..").join("loss.npy");
    std::fs::create_dir(dir.path("sub")).unwrap();
    fails_with(
        &xent(&dir.arg("loss.npy"), &other.display().to_string()),
        "same file",
    );
    assert_eq!(std::fs::read(&loss).unwrap(), b"old loss");
    let fresh = dir.path("sub").join("..").join("fresh.npy");
    fails_with(
        &xent(&dir.arg("fresh.npy"), &fresh.display().to_string()),
        "same file",
    );
    assert!(!dir.path("fresh.npy").exists());
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("loss.npy", dir.path("alias.npy")).unwrap();
        fails_with(
            &xent(&dir.arg("alias.npy"), &dir.arg("loss.npy")),
            "same file",
        );
        assert_eq!(std::fs::read(&loss).unwrap(), b"old loss");
    }
}

/// Shapes whose bytes cannot be counted or allocated are refused in one line, never by a panic
/// or an abort on a failed allocation.
#[test]
fn bench_refuses_shapes_too_large_for_memory() {
    if context().is_none() {
        return;
    }
    for (shape, needle) in [
        ("4294967296x4294967296", "too large"),
        ("4611686018427387904x4", "too large"),
        ("4x4294967296", "cols must be at most"),
        // 2^62 bytes a matrix: countable, but not six times over.
        ("1099511627776x1048576", "host memory"),
        // 2^48 bytes a matrix: more than any address space holds.
        ("68719476736x1024", "host memory"),
    ] {
        let output = runner()
            .args(["bench", "--no-gpu", "--repeats", "1", "--shape", shape])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{shape}: {stderr}");
        assert!(stderr.contains(needle), "{shape}: {stderr}");
        assert!(!stderr.contains("panicked"), "{shape}: {stderr}");
    }

    // A matrix just over the adapter's largest buffer is refused before the host fills one.
    let max = context().unwrap().device().limits().max_buffer_size;
    let shape = format!("{}x1024", max / 4096 + 1);
    let output = runner()
        .args(["bench", "--no-cpu", "--op", "softmax", "--shape", &shape])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{shape}: {stderr}");
    assert!(stderr.contains("max_buffer_size"), "{shape}: {stderr}");
}

/// A failure names what the user gave: the targets file for a bad target, at its index in the
/// targets array; the flag for a bad flag; the axis for an empty one.
#[test]
fn apply_errors_name_the_flag_or_file_at_fault() {
    if context().is_none() {
        return;
    }
    let dir = Dir::new("runner-blame");
    write(&dir.path("x.npy"), &[2, 3, 5], &[0.0f32; 30]);
    let mut t = vec![0i64; 10];
    t[9] = 7;
    write(&dir.path("t_oor.npy"), &[2, 5], &t);
    write(&dir.path("t.npy"), &[2, 5], &[0i64; 10]);
    write::<f32>(&dir.path("no-classes.npy"), &[4, 0], &[]);
    write(&dir.path("t4.npy"), &[4], &[0i64; 4]);
    let out = dir.arg("out.npy");
    let xent = |input: &str, targets: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "apply",
            "cross-entropy",
            "--input",
            &dir.arg(input),
            "--targets",
            &dir.arg(targets),
            "--output",
            &out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    write(&dir.path("x-gap.npy"), &[2, 0, 3], &[1.0f32; 0]);
    let along = |op: &str, input: &str, axis: &str| -> Vec<String> {
        [
            "apply",
            op,
            "--input",
            &dir.arg(input),
            "--output",
            &out,
            "--axis",
            axis,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let cases = [
        (
            xent("x.npy", "t_oor.npy", &[]),
            "t_oor.npy: target 7 at index (1, 4) is outside [0, 3)",
        ),
        (
            xent("x.npy", "t.npy", &["--label-smoothing", "1.5"]),
            "apply: --label-smoothing must lie in [0, 1], got 1.5",
        ),
        (
            xent("no-classes.npy", "t4.npy", &[]),
            "no-classes.npy: the class axis (axis 1) has length 0",
        ),
        (
            xent("x.npy", "t.npy", &["--axis", "3"]),
            "x.npy: --axis 3 is out of range for an array of rank 3",
        ),
        (
            xent("x.npy", "t.npy", &["--axis", "-1"]),
            "t.npy: class-index targets must have shape [2, 3] (the logits without axis -1), got [2, 5]",
        ),
        (
            along("softmax", "x.npy", "3"),
            "x.npy: --axis 3 is out of range for an array of rank 3",
        ),
        (
            along("log-softmax", "x.npy", "-4"),
            "x.npy: --axis -4 is out of range for an array of rank 3",
        ),
        (
            along("softmax", "x-gap.npy", "3"),
            "x-gap.npy: --axis 3 is out of range for an array of rank 3",
        ),
    ];
    for (args, needle) in cases {
        fails_with(&args, needle);
        assert!(!Path::new(&out).exists(), "{args:?} left {out}");
    }
}

/// An option the op does not use is refused, naming the option and the op, rather than ignored.
#[test]
fn options_of_other_ops_are_refused() {
    if context().is_none() {
        return;
    }
    let dir = batch_dir("runner-foreign-options");
    let out = dir.arg("out.npy");
    let x = dir.arg("x.npy");
    for (op, extra, flag) in [
        ("softmax", vec!["--grad", x.as_str()], "--grad"),
        ("softmax", vec!["--targets", x.as_str()], "--targets"),
        ("log-softmax", vec!["--weight", x.as_str()], "--weight"),
        (
            "softmax",
            vec!["--label-smoothing", "0.1"],
            "--label-smoothing",
        ),
        ("softmax", vec!["--reduction", "sum"], "--reduction"),
        ("softmax", vec!["--ignore-index", "3"], "--ignore-index"),
        (
            "softmax",
            vec!["--grad-output", &dir.arg("g.npy")],
            "--grad-output",
        ),
        (
            "softmax-backward",
            vec!["--targets", x.as_str()],
            "--targets",
        ),
        ("cross-entropy", vec!["--grad", x.as_str()], "--grad"),
    ] {
        let mut args: Vec<String> = ["apply", op, "--input", &x, "--output", &out]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        fails_with(&args, &format!("{flag} does not apply to {op}"));
        assert!(!Path::new(&out).exists(), "{args:?} left {out}");
    }
}

/// `bench` refuses what it cannot do as asked rather than doing something else without a word;
/// a tuning value the limits clamp is run, and reported.
#[test]
fn bench_refuses_arguments_it_would_change() {
    if context().is_none() {
        return;
    }
    for (extra, needle) in [
        (&["--repeats", "0"][..], "at least 1"),
        (&["--no-gpu", "--no-cpu"][..], "cannot be used with"),
        (&["--op", "copy"][..], "unknown op \"copy\""),
        (&["--tune", "vector=3"][..], "vector must be 1 or 4"),
        (&["--tune", "subgroups=2"][..], "subgroups must be 0 or 1"),
        (
            &["--tune", "max_items=5"][..],
            "max_items must be a power of two",
        ),
        (
            &["--tune", "split_chunk=0"][..],
            "split_chunk must be at least 1",
        ),
        (
            &["--tune", "row_workgroup=0"][..],
            "row_workgroup must be at least 1",
        ),
        (&["--tune", "no_such_field=1"][..], "unknown tuning field"),
    ] {
        let output = runner()
            .args(["bench", "--shape", "3x5", "--op", "softmax"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{extra:?}: {output:?}");
    }

    // No kernel runs a row of more than 4096 columns on one invocation.
    let output = runner()
        .args([
            "bench",
            "--shape",
            "3x5",
            "--op",
            "softmax",
            "--repeats",
            "1",
        ])
        .args(["--no-cpu", "--json", "--tune", "thread_max_cols=5000"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("thread_max_cols=5000 is clamped to 4096"),
        "{stderr}"
    );
    let records: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["tuning"]["thread_max_cols"], 4096, "{records:?}");
}

/// A negative number is a value, so the range check explains what is wrong with it.
#[test]
fn negative_numbers_reach_the_range_checks() {
    if context().is_none() {
        return;
    }
    let dir = batch_dir("runner-negative");
    let out = dir.arg("out.npy");
    let args = cross_entropy_args(&dir, &["--output", &out, "--label-smoothing", "-0.1"]);
    fails_with(&args, "--label-smoothing must lie in [0, 1], got -0.1");
    assert!(!Path::new(&out).exists());

    for (extra, needle) in [
        (["--repeats", "-1"], "must be at least 1, got -1"),
        (["--shape", "-3x5"], "must have every dimension >= 1"),
        (["--shape", "3x5x-2"], "must have every dimension >= 1"),
    ] {
        let output = runner()
            .args(["bench", "--op", "softmax"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
}

/// A file of the wrong element type is told what that input takes, and how to convert it.
#[test]
fn wrong_dtype_names_what_the_input_takes() {
    if context().is_none() {
        return;
    }
    let dir = Dir::new("runner-dtype");
    write(&dir.path("f64.npy"), &[2, 3], &[0.5f64; 6]);
    write(&dir.path("x.npy"), &[2, 3], &[0.5f32; 6]);
    let out = dir.arg("out.npy");
    let args = |op: &str, extra: &[String]| -> Vec<String> {
        let mut args: Vec<String> = ["apply", op, "--output", &out]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend_from_slice(extra);
        args
    };
    fails_with(
        &args("softmax", &["--input".into(), dir.arg("f64.npy")]),
        "f64.npy holds float64; expected float32 (convert with x.astype(np.float32))",
    );
    fails_with(
        &args(
            "softmax-backward",
            &[
                "--input".into(),
                dir.arg("x.npy"),
                "--grad".into(),
                dir.arg("f64.npy"),
            ],
        ),
        "f64.npy holds float64; expected float32 (",
    );
    fails_with(
        &args(
            "cross-entropy",
            &[
                "--input".into(),
                dir.arg("x.npy"),
                "--targets".into(),
                dir.arg("f64.npy"),
            ],
        ),
        "f64.npy holds float64; expected int64 or int32 class indices, or float32 probabilities",
    );
    assert!(!Path::new(&out).exists());
}

/// `bench --no-gpu` looks for no adapter, so the adapter variables cannot stop it; a
/// `WGPU_BACKEND` that wgpu would read as no backend at all is explained as such.
#[test]
fn adapter_variables_are_checked_only_where_an_adapter_is_needed() {
    if context().is_none() {
        return;
    }
    let output = runner()
        .args(["bench", "--no-gpu", "--shape", "3x5", "--op", "softmax"])
        .args(["--repeats", "1", "--json"])
        .env("WGPU_ADAPTER_NAME", "zzz-no-such-adapter")
        .env("WGPU_BACKEND", "bogus")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let records: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["device"], "cpu", "{records:?}");

    for (value, needle) in [
        ("bogus", "WGPU_BACKEND=\"bogus\" is not understood"),
        ("gl,vulkn", "\"vulkn\" is not a backend"),
        ("", "names no backend"),
    ] {
        let output = runner()
            .args(["info", "--short"])
            .env("WGPU_BACKEND", value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{value:?}: {stderr}");
        assert!(stderr.contains(needle), "{value:?}: {stderr}");
        assert!(stderr.contains("vulkan, vk"), "{value:?}: {stderr}");
    }
}
