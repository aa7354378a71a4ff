//! Every failure of `apply` that the library can report, and the runner's own checks: exit code
//! 2, one line on stderr naming the problem, and no output file left behind (not even the loss
//! when only the gradient could not be written).

mod common;

use std::path::Path;

use common::context;
use common::files::{runner, write, Dir};

#[test]
fn every_apply_failure_is_one_line_exit_2_and_no_output() {
    if context().is_none() {
        return;
    }
    let dir = Dir::new("runner-errors");
    write(
        &dir.path("x.npy"),
        &[2, 3],
        &[0.5f32, 1.0, 2.0, 0.0, 0.0, 0.0],
    );
    write(&dir.path("x3.npy"), &[2, 3, 2], &[0.0f32; 12]);
    write(&dir.path("vec.npy"), &[3], &[0.0f32; 3]);
    write(&dir.path("dy-wrong.npy"), &[3, 2], &[0.0f32; 6]);
    write(&dir.path("t.npy"), &[2], &[0i64, 1]);
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
        (xent(&["--targets", &dir.arg("t-i32-bad.npy")]), "row 1"),
        (xent(&["--targets", &dir.arg("t-short.npy")]), "t-short.npy"),
        (xent(&["--targets", &dir.arg("p-wrong.npy")]), "p-wrong.npy"),
        (xent(&["--targets", &dir.arg("t-f64.npy")]), "t-f64.npy"),
        (
            xent(&["--targets", &t, "--weight", &dir.arg("w-wrong.npy")]),
            "weight",
        ),
        (
            xent(&["--targets", &t, "--label-smoothing", "2"]),
            "label_smoothing",
        ),
        (
            xent(&["--targets", &t, "--label-smoothing", "NaN"]),
            "label_smoothing",
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
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("wgpu-softmax"))
            .collect();
        assert_eq!(ours.len(), 1, "{args:?}: {stderr}");
        assert!(ours[0].contains(needle), "{args:?}: {stderr}");
        assert!(!Path::new(&out).exists(), "{args:?} left {out}");
        assert!(!Path::new(&grad).exists(), "{args:?} left {grad}");
    }
}
