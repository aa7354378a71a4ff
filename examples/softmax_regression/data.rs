//! The handwritten digits of `examples/data/digits.csv.gz`, split and standardised.

use std::io::Read;

/// Pixels per image (8 x 8).
pub const FEATURES: usize = 64;
/// Digits 0..=9.
pub const CLASSES: usize = 10;
/// Columns of a design matrix: the pixels and a constant 1, whose weights are the biases.
pub const INPUTS: usize = FEATURES + 1;
/// The first this many rows (80%) train, the remaining 360 test, in the file's order, unshuffled,
/// so the split is the same everywhere; both parts hold every class in near-equal numbers.
pub const TRAIN_ROWS: usize = 1437;

/// The file, compressed, built into the binary so the example runs from any directory.
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Rows of standardised pixels with a trailing 1, and their labels.
pub struct Split {
    /// `rows x INPUTS`, row-major.
    pub x: Vec<f32>,
    /// The digit of each row.
    pub labels: Vec<i32>,
}

impl Split {
    pub fn rows(&self) -> usize {
        self.labels.len()
    }
}

pub struct Digits {
    pub train: Split,
    pub test: Split,
}

/// Reads and parses the file, splits it, and standardises every pixel with the mean and standard
/// deviation of the training rows (statistics of the test rows would leak into the model).
pub fn load() -> Result<Digits, String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| format!("digits.csv.gz: {e}"))?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        let values = line
            .split(',')
            .map(|v| v.trim().parse::<u8>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("digits.csv.gz line {}: {e}", line_no + 1))?;
        let (&label, row) = values
            .split_last()
            .filter(|(_, row)| row.len() == FEATURES)
            .ok_or_else(|| format!("digits.csv.gz line {}: not 65 values", line_no + 1))?;
        if usize::from(label) >= CLASSES {
            return Err(format!("digits.csv.gz line {}: label {label}", line_no + 1));
        }
        pixels.extend(row.iter().map(|&p| f64::from(p)));
        labels.push(i32::from(label));
    }
    if labels.len() <= TRAIN_ROWS {
        return Err(format!("digits.csv.gz: only {} rows", labels.len()));
    }

    let train_pixels = &pixels[..TRAIN_ROWS * FEATURES];
    let mut mean = [0.0f64; FEATURES];
    let mut var = [0.0f64; FEATURES];
    for row in train_pixels.chunks_exact(FEATURES) {
        for (m, &p) in mean.iter_mut().zip(row) {
            *m += p / TRAIN_ROWS as f64;
        }
    }
    for row in train_pixels.chunks_exact(FEATURES) {
        for ((v, &m), &p) in var.iter_mut().zip(&mean).zip(row) {
            *v += (p - m) * (p - m) / TRAIN_ROWS as f64;
        }
    }
    // A pixel that is constant over the training rows tells the model nothing; it becomes 0
    // everywhere rather than an unscaled value on the test rows.
    let inv_std = var.map(|v| if v > 0.0 { 1.0 / v.sqrt() } else { 0.0 });

    let design = |rows: std::ops::Range<usize>| {
        let mut x = Vec::with_capacity(rows.len() * INPUTS);
        for row in pixels[rows.start * FEATURES..rows.end * FEATURES].chunks_exact(FEATURES) {
            for ((&p, &m), &s) in row.iter().zip(&mean).zip(&inv_std) {
                x.push(((p - m) * s) as f32);
            }
            x.push(1.0);
        }
        x
    };
    let all = labels.len();
    Ok(Digits {
        train: Split {
            x: design(0..TRAIN_ROWS),
            labels: labels[..TRAIN_ROWS].to_vec(),
        },
        test: Split {
            x: design(TRAIN_ROWS..all),
            labels: labels[TRAIN_ROWS..].to_vec(),
        },
    })
}
