//! Files for the runner's tests: `.npy` in and out, a scratch directory, the runner itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use npyz::WriterBuilder;

/// The runner binary built with the tests.
pub fn runner() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wgpu-softmax"))
}

/// Writes a C-order `.npy` of `shape` holding `data`.
pub fn write<T: npyz::Serialize + npyz::AutoSerialize + Copy>(
    path: &Path,
    shape: &[u64],
    data: &[T],
) {
    let file = std::fs::File::create(path).unwrap();
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(std::io::BufWriter::new(file))
        .begin_nd()
        .unwrap();
    writer.extend(data.iter().copied()).unwrap();
    writer.finish().unwrap();
}

/// Asserts that a run failed with exit code 2 and exactly one line of ours on stderr (Mesa's
/// drivers may add their own, e.g. about XDG_RUNTIME_DIR), containing `needle`. `what` names the
/// run in a failure.
pub fn assert_one_error_line(output: &std::process::Output, what: &str, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{what}: {stderr}");
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("wgpu-softmax"))
        .collect();
    assert_eq!(ours.len(), 1, "{what}: {stderr}");
    assert!(ours[0].contains(needle), "{what}: {stderr}");
}

/// Reads a float32 `.npy`: its shape and data.
pub fn read(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec::<f32>().unwrap())
}

/// A scratch directory holding a 2x3 batch of logits, `x.npy`, and its targets, `t.npy`.
pub fn batch_dir(name: &str) -> Dir {
    let dir = Dir::new(name);
    write(
        &dir.path("x.npy"),
        &[2, 3],
        &[0.5f32, 1.0, 2.0, 0.0, 0.0, 0.0],
    );
    write(&dir.path("t.npy"), &[2], &[0i64, 1]);
    dir
}

/// A scratch directory, removed when dropped.
pub struct Dir(PathBuf);

impl Dir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wgpu-softmax-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    pub fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
