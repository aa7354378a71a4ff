//! Reading and writing NumPy `.npy` files for the `apply` subcommand.
//!
//! Input files come from users, so `read` treats every file as hostile: it checks the header's
//! claims against the file size before npyz is allowed to interpret them or allocate anything.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use npyz::{DType, NpyFile, NpyHeader, Order, TypeChar, WriteOptions, WriterBuilder};
use py_literal::Value;
use thiserror::Error;

/// numpy itself refuses headers longer than 10 000 bytes unless told otherwise; this leaves room
/// for odd writers while keeping a hostile length field from allocating gigabytes.
const MAX_HEADER_LEN: usize = 1 << 16;

/// Real headers nest two or three levels. The header parser recurses once per bracket and stops
/// only at a stack limit, with an error that echoes the whole header; refusing deep nesting up
/// front keeps both the recursion and the message small.
const MAX_HEADER_NESTING: usize = 32;

/// The element types an input may hold, in the words its error message uses.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    kinds: &'static [ElementKind],
    /// E.g. `float32 (convert with x.astype(np.float32))`.
    words: &'static str,
}

impl Expected {
    /// Everything `read` can read.
    pub const ANY: Expected = Expected {
        kinds: &[ElementKind::F32, ElementKind::I64, ElementKind::I32],
        words: "float32, int64 or int32",
    };

    /// Float inputs: logits, probabilities, gradients, weights.
    pub const FLOAT32: Expected = Expected {
        kinds: &[ElementKind::F32],
        words: "float32 (convert with x.astype(np.float32))",
    };

    /// Cross-entropy targets: class indices or probabilities.
    pub const TARGETS: Expected = Expected {
        kinds: &[ElementKind::I64, ElementKind::I32, ElementKind::F32],
        words: "int64 or int32 class indices, or float32 probabilities (convert with t.astype(np.int64) or t.astype(np.float32))",
    };
}

#[derive(Debug, Error)]
pub enum NpyError {
    #[error("cannot {action} {}: {}", path.display(), one_line(&error.to_string()))]
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
    #[error("{} is not a valid .npy file: {}", path.display(), one_line(reason))]
    Malformed { path: PathBuf, reason: String },
    #[error("{} holds {}; expected {expected}", path.display(), one_line(found))]
    UnsupportedDtype {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error("cannot write {}: {reason}", path.display())]
    ShapeMismatch { path: PathBuf, reason: String },
}

impl NpyError {
    #[allow(dead_code)] // for callers that report the file separately from the message
    pub fn path(&self) -> &Path {
        match self {
            NpyError::Io { path, .. }
            | NpyError::Malformed { path, .. }
            | NpyError::UnsupportedDtype { path, .. }
            | NpyError::ShapeMismatch { path, .. } => path,
        }
    }

    fn malformed(path: &Path, reason: impl ToString) -> Self {
        NpyError::Malformed {
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }

    fn io(path: &Path, action: &'static str, error: io::Error) -> Self {
        NpyError::Io {
            path: path.to_owned(),
            action,
            error,
        }
    }
}

/// Parser errors from the header's Python literal span several lines (with a caret diagram)
/// and quote the offending header, but callers print errors on one line.
fn one_line(text: &str) -> String {
    const MAX_CHARS: usize = 300;
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
}

/// An array in C order: the last axis varies fastest, whatever order the file used.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
    /// Kept so that a later dtype complaint can name the file.
    path: PathBuf,
}

#[allow(dead_code)] // not every helper is needed by every subcommand
impl NpyArray {
    /// The file this array was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// numpy's name for the element type.
    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            NpyData::F32(_) => "float32",
            NpyData::I64(_) => "int64",
            NpyData::I32(_) => "int32",
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            NpyData::F32(v) => v.len(),
            NpyData::I64(v) => v.len(),
            NpyData::I32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values, if the file held float32; integers are refused rather than converted because
    /// an integer file passed where logits are expected is almost certainly the wrong file.
    pub fn into_f32(self) -> Result<Vec<f32>, NpyError> {
        let found = self.dtype_name();
        match self.data {
            NpyData::F32(values) => Ok(values),
            NpyData::I64(_) | NpyData::I32(_) => Err(NpyError::UnsupportedDtype {
                path: self.path,
                found: found.to_owned(),
                expected: Expected::FLOAT32.words,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ElementKind {
    F32,
    I64,
    I32,
}

impl ElementKind {
    fn of(dtype: &DType) -> Option<Self> {
        let DType::Plain(ty) = dtype else {
            return None;
        };
        match (ty.type_char(), ty.size_field()) {
            (TypeChar::Float, 4) => Some(ElementKind::F32),
            (TypeChar::Int, 8) => Some(ElementKind::I64),
            (TypeChar::Int, 4) => Some(ElementKind::I32),
            _ => None,
        }
    }

    fn size(self) -> u64 {
        match self {
            ElementKind::F32 | ElementKind::I32 => 4,
            ElementKind::I64 => 8,
        }
    }
}

/// Names a dtype the way a numpy user would recognise it.
fn describe_dtype(dtype: &DType) -> String {
    let DType::Plain(ty) = dtype else {
        return format!("a structured dtype {}", dtype.descr());
    };
    let bits = ty.size_field().saturating_mul(8);
    match ty.type_char() {
        TypeChar::Bool => "bool".to_owned(),
        TypeChar::Int => format!("int{bits}"),
        TypeChar::Uint => format!("uint{bits}"),
        TypeChar::Float => format!("float{bits}"),
        TypeChar::Complex => format!("complex{bits}"),
        TypeChar::TimeDelta => "timedelta64".to_owned(),
        TypeChar::DateTime => "datetime64".to_owned(),
        TypeChar::Object => "Python objects".to_owned(),
        _ => format!("dtype '{ty}'"),
    }
}

/// The number of elements of `shape`, or `None` when it does not fit in a u64.
///
/// Zero-length axes are skipped while checking for overflow because npyz multiplies the axes
/// in both directions (for the element count and for the strides): a shape such as
/// `(0, 2**40, 2**40)` has no elements, yet would still overflow there.
fn element_count(shape: &[u64]) -> Option<u64> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

fn format_shape<T: std::fmt::Display>(shape: &[T]) -> String {
    match shape {
        [only] => format!("({only},)"),
        _ => {
            let axes: Vec<String> = shape.iter().map(ToString::to_string).collect();
            format!("({})", axes.join(", "))
        }
    }
}

/// Reads an `.npy` file holding float32, int64 or int32 values of any rank and byte order.
/// Fortran-ordered files are transposed, so the result is always in C order.
#[allow(dead_code)] // every input says what it expects; the tests read anything
pub fn read(path: &Path) -> Result<NpyArray, NpyError> {
    read_as(path, Expected::ANY)
}

/// Like [`read`], refusing (before reading the data) an element type `expected` does not list.
pub fn read_as(path: &Path, expected: Expected) -> Result<NpyArray, NpyError> {
    let file = File::open(path).map_err(|e| NpyError::io(path, "open", e))?;
    let file_len = file
        .metadata()
        .map_err(|e| NpyError::io(path, "read", e))?
        .len();
    let mut reader = BufReader::new(file);

    let header_bytes = read_header_bytes(&mut reader, file_len).map_err(|e| match e {
        HeaderError::Io(e) => NpyError::io(path, "read", e),
        HeaderError::Malformed(reason) => NpyError::malformed(path, reason),
    })?;
    let header =
        NpyHeader::from_reader(&header_bytes[..]).map_err(|e| NpyError::malformed(path, e))?;

    let dtype = header.dtype();
    let Some(kind) = ElementKind::of(&dtype).filter(|k| expected.kinds.contains(k)) else {
        return Err(NpyError::UnsupportedDtype {
            path: path.to_owned(),
            found: describe_dtype(&dtype),
            expected: expected.words,
        });
    };

    let too_big = || {
        NpyError::malformed(
            path,
            format!(
                "shape {} has too many elements",
                format_shape(header.shape())
            ),
        )
    };
    let count = element_count(header.shape()).ok_or_else(too_big)?;
    let shape = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| too_big())?;
    let expected_bytes = count.checked_mul(kind.size()).ok_or_else(too_big)?;
    let actual_bytes = file_len - header_bytes.len() as u64;
    if expected_bytes != actual_bytes {
        return Err(NpyError::malformed(
            path,
            format!(
                "header promises {expected_bytes} bytes of data (shape {}, {}) but the file holds {actual_bytes}",
                format_shape(&shape),
                describe_dtype(&dtype),
            ),
        ));
    }
    // Matching the file size bounds the count, but on a 32-bit target it can still exceed usize.
    usize::try_from(count).map_err(|_| too_big())?;

    let fortran = header.order() == Order::Fortran;
    let npy = NpyFile::with_header(header, reader);
    let read_err = |e| NpyError::io(path, "read", e);
    let data = match kind {
        ElementKind::F32 => NpyData::F32(fortran_to_c(
            &shape,
            fortran,
            npy.into_vec().map_err(read_err)?,
        )),
        ElementKind::I64 => NpyData::I64(fortran_to_c(
            &shape,
            fortran,
            npy.into_vec().map_err(read_err)?,
        )),
        ElementKind::I32 => NpyData::I32(fortran_to_c(
            &shape,
            fortran,
            npy.into_vec().map_err(read_err)?,
        )),
    };
    Ok(NpyArray {
        shape,
        data,
        path: path.to_owned(),
    })
}

enum HeaderError {
    Io(io::Error),
    Malformed(String),
}

impl From<String> for HeaderError {
    fn from(reason: String) -> Self {
        HeaderError::Malformed(reason)
    }
}

/// Reads the magic string, version, header length and header text, after checking the parts
/// npyz would trust blindly: the header length (it allocates that much), the nesting depth, and
/// the shape's element count (npyz multiplies the axes without overflow checks).
fn read_header_bytes(reader: &mut impl Read, file_len: u64) -> Result<Vec<u8>, HeaderError> {
    let truncated = |what: &str| format!("file ends inside the {what} ({file_len} bytes long)");

    let mut bytes = vec![0u8; 8];
    read_exact_or(reader, &mut bytes, || truncated("magic string"))?;
    if &bytes[..6] != b"\x93NUMPY" {
        return Err(HeaderError::Malformed(
            "wrong magic string (expected \\x93NUMPY)".to_owned(),
        ));
    }
    let len_field_size = match (bytes[6], bytes[7]) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        (major, minor) => {
            return Err(HeaderError::Malformed(format!(
                "unsupported format version {major}.{minor}"
            )))
        }
    };
    let mut len_field = [0u8; 4];
    read_exact_or(reader, &mut len_field[..len_field_size], || {
        truncated("header length")
    })?;
    bytes.extend_from_slice(&len_field[..len_field_size]);
    let header_len = u32::from_le_bytes(len_field) as usize;
    if header_len > MAX_HEADER_LEN {
        return Err(HeaderError::Malformed(format!(
            "header claims to be {header_len} bytes long (at most {MAX_HEADER_LEN} accepted)"
        )));
    }
    if (bytes.len() + header_len) as u64 > file_len {
        return Err(HeaderError::Malformed(truncated("header")));
    }
    let text_start = bytes.len();
    bytes.resize(text_start + header_len, 0);
    read_exact_or(reader, &mut bytes[text_start..], || truncated("header"))?;

    check_header_text(&bytes[text_start..])?;
    Ok(bytes)
}

fn read_exact_or(
    reader: &mut impl Read,
    buf: &mut [u8],
    on_eof: impl FnOnce() -> String,
) -> Result<(), HeaderError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => HeaderError::Malformed(on_eof()),
        _ => HeaderError::Io(e),
    })
}

fn check_header_text(text: &[u8]) -> Result<(), String> {
    let mut depth = 0usize;
    for &byte in text {
        match byte {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_HEADER_NESTING {
            return Err(format!(
                "header nests deeper than {MAX_HEADER_NESTING} levels"
            ));
        }
    }

    // Everything else about the header is left for npyz to judge; only the shape has to be
    // looked at first, so that an overflowing element count becomes an error, not a panic.
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let Ok(Value::Dict(entries)) = std::str::from_utf8(text)
        .map_err(|_| ())
        .and_then(|s| s.parse::<Value>().map_err(|_| ()))
    else {
        return Ok(());
    };
    let shape = entries.iter().find_map(|(key, value)| match (key, value) {
        (Value::String(key), Value::Tuple(axes) | Value::List(axes)) if key == "shape" => {
            Some(axes)
        }
        _ => None,
    });
    let Some(axes) = shape else {
        return Ok(());
    };
    let mut dims = Vec::with_capacity(axes.len());
    for axis in axes {
        match axis {
            Value::Integer(n) => match u64::try_from(n) {
                Ok(d) => dims.push(d),
                Err(_) => return Err(format!("shape axis {n} is negative or too large")),
            },
            _ => return Ok(()),
        }
    }
    match element_count(&dims) {
        Some(_) => Ok(()),
        None => Err(format!(
            "shape {} has too many elements",
            format_shape(&dims)
        )),
    }
}

/// Reorders a Fortran-order (first axis fastest) buffer into C order.
fn fortran_to_c<T: Copy>(shape: &[usize], fortran: bool, data: Vec<T>) -> Vec<T> {
    if !fortran || shape.len() < 2 || data.is_empty() {
        return data;
    }
    // With no zero-length axis, every partial product is at most data.len().
    let mut strides = Vec::with_capacity(shape.len());
    let mut stride = 1usize;
    for &dim in shape {
        strides.push(stride);
        stride *= dim;
    }
    let mut index = vec![0usize; shape.len()];
    let mut offset = 0usize;
    let mut out = Vec::with_capacity(data.len());
    for _ in 0..data.len() {
        out.push(data[offset]);
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            offset += strides[axis];
            if index[axis] < shape[axis] {
                break;
            }
            offset -= strides[axis] * shape[axis];
            index[axis] = 0;
        }
    }
    out
}

/// Symbolic links followed before giving up, as the kernel's own limit for a path.
const MAX_LINKS: usize = 40;

/// A `.npy` file written but not yet in place: [`Staged::commit`] puts it there. Staging every
/// output of a command before committing any lets a failure leave all the old files intact.
pub struct Staged<'a> {
    /// The path as the user gave it, for messages.
    path: PathBuf,
    target: Target<'a>,
}

enum Target<'a> {
    /// The complete file, in a temporary file beside `destination` (a regular file or none yet)
    /// and renamed over it at commit.
    Replace {
        temp: tempfile::NamedTempFile,
        destination: PathBuf,
    },
    /// `destination` exists and is not a regular file (a character device such as /dev/null, a
    /// FIFO): renaming over it would replace the device itself, so the data is written into it
    /// at commit.
    InPlace {
        destination: PathBuf,
        shape: Vec<u64>,
        data: &'a [f32],
    },
}

impl Staged<'_> {
    /// Puts the file in place: renames the temporary file over the destination, or writes into
    /// a device or FIFO.
    pub fn commit(self) -> Result<(), NpyError> {
        let io_err = |e| NpyError::io(&self.path, "write", e);
        match self.target {
            Target::Replace { temp, destination } => {
                temp.persist(&destination).map_err(|e| io_err(e.error))?;
            }
            Target::InPlace {
                destination,
                shape,
                data,
            } => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&destination)
                    .map_err(io_err)?;
                write_body(&mut file, &shape, data).map_err(io_err)?;
            }
        }
        Ok(())
    }
}

/// Puts staged files in place: those written into devices and FIFOs first (the writes that can
/// still fail), then the renames. Nothing is put in place unless every file was staged.
pub fn commit_all<'a>(staged: impl IntoIterator<Item = Staged<'a>>) -> Result<(), NpyError> {
    let (in_place, renamed): (Vec<_>, Vec<_>) = staged
        .into_iter()
        .partition(|s| matches!(s.target, Target::InPlace { .. }));
    in_place
        .into_iter()
        .chain(renamed)
        .try_for_each(Staged::commit)
}

/// Whether writing to `a` and to `b` would write the same file: links followed, the paths
/// compared in canonical form (for a file not there yet, its directory's canonical form).
pub fn same_file(a: &Path, b: &Path) -> bool {
    identity(a) == identity(b)
}

fn identity(path: &Path) -> PathBuf {
    let resolved = resolve_links(path).unwrap_or_else(|_| path.to_owned());
    if let Ok(canonical) = std::fs::canonicalize(&resolved) {
        return canonical;
    }
    match (
        std::fs::canonicalize(directory_of(&resolved)),
        resolved.file_name(),
    ) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => resolved,
    }
}

/// Writes `data` as a little-endian float32 C-order `.npy` file of the given shape.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    stage_f32(path, shape, data)?.commit()
}

/// Prepares `data` as a little-endian float32 C-order `.npy` file of the given shape, to be put
/// at `path` by [`Staged::commit`].
///
/// A symbolic link is followed: the file it points to is written. A regular file appears
/// complete or not at all: the data goes to a temporary file beside it, renamed over it only
/// once everything is on disk, so a reader never sees half a file and a failed write leaves no
/// debris; an existing file must be writable by the user, and the new one gets its permissions.
/// An existing device or FIFO is written into at commit instead.
pub fn stage_f32<'a>(
    path: &Path,
    shape: &[usize],
    data: &'a [f32],
) -> Result<Staged<'a>, NpyError> {
    let shape_u64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let count = element_count(&shape_u64);
    if count != Some(data.len() as u64) {
        let elements = match count {
            Some(n) => format!("{n} elements"),
            None => "too many elements".to_owned(),
        };
        return Err(NpyError::ShapeMismatch {
            path: path.to_owned(),
            reason: format!(
                "shape {} has {elements} but {} values were given",
                format_shape(shape),
                data.len()
            ),
        });
    }

    let io_err = |e| NpyError::io(path, "write", e);
    let destination = resolve_links(path).map_err(io_err)?;
    let existing = match std::fs::metadata(&destination) {
        Ok(metadata) => Some(metadata),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let old = match existing {
        Some(m) if m.is_dir() => {
            return Err(io_err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "it is a directory",
            )))
        }
        Some(m) if !m.is_file() => {
            return Ok(Staged {
                path: path.to_owned(),
                target: Target::InPlace {
                    destination,
                    shape: shape_u64,
                    data,
                },
            });
        }
        Some(m) => {
            // Renaming needs only the directory's permission; the user's right to change this
            // file is what counts. Opening without truncating checks it and changes nothing.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&destination)
                .map_err(io_err)?;
            Some(m)
        }
        None => None,
    };

    let dir = directory_of(&destination);
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(destination.file_name().unwrap_or_default());
    prefix.push(".");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // Temporary files are private by default; a new result should get the permissions any
    // newly created file gets (0666 less the umask).
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut temp = builder.tempfile_in(dir).map_err(io_err)?;
    if let Some(old) = old {
        keep_owner_and_permissions(temp.as_file(), &old).map_err(io_err)?;
    }

    write_body(temp.as_file_mut(), &shape_u64, data).map_err(io_err)?;
    temp.as_file().sync_all().map_err(io_err)?;
    Ok(Staged {
        path: path.to_owned(),
        target: Target::Replace { temp, destination },
    })
}

/// Gives the replacement of an existing file that file's permissions (exactly, whatever the
/// umask) and, where the user may, its owner and group.
fn keep_owner_and_permissions(file: &File, old: &std::fs::Metadata) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // Only a privileged user may give a file away; anyone else keeps the file as their own,
        // as if they had created it.
        let _ = std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid()));
    }
    // After the owner: changing it may clear the set-id bits.
    file.set_permissions(old.permissions())
}

/// `path` with every symbolic link at its end followed (a dangling link gives the path it points
/// to, where the file will be created).
fn resolve_links(path: &Path) -> io::Result<PathBuf> {
    let mut current = path.to_owned();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&current) {
            Ok(metadata) if metadata.file_type().is_symlink() => {
                // A relative target is relative to the link's directory; an absolute one
                // replaces the whole path.
                let target = std::fs::read_link(&current)?;
                current = directory_of(&current).join(target);
            }
            _ => return Ok(current),
        }
    }
    Err(io::Error::other(format!(
        "more than {MAX_LINKS} levels of symbolic links"
    )))
}

/// The directory `path` lives in, which must hold the temporary file for the rename to be atomic.
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

fn write_body(file: &mut File, shape: &[u64], data: &[f32]) -> io::Result<()> {
    let little_endian_f32 = "<f4"
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut out = BufWriter::new(file);
    let mut writer = WriteOptions::new()
        .dtype(DType::new_scalar(little_endian_f32))
        .shape(shape)
        .writer(&mut out)
        .begin_nd()?;
    writer.extend(data.iter().copied())?;
    writer.finish()?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tempfile::TempDir;

    fn write_with<T: npyz::Serialize + Clone>(
        path: &Path,
        descr: &str,
        order: Order,
        shape: &[u64],
        data: &[T],
    ) {
        let mut file = File::create(path).unwrap();
        let mut writer = WriteOptions::new()
            .dtype(DType::new_scalar(descr.parse().unwrap()))
            .order(order)
            .shape(shape)
            .writer(&mut file)
            .begin_nd()
            .unwrap();
        writer.extend(data.iter().cloned()).unwrap();
        writer.finish().unwrap();
    }

    /// A version 1.0 file with the given header text, padded the way numpy pads it.
    fn raw_npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut text = header.to_owned();
        while !(10 + text.len() + 1).is_multiple_of(16) {
            text.push(' ');
        }
        text.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(text.len() as u16).to_le_bytes());
        bytes.extend_from_slice(text.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn read_err(bytes: &[u8]) -> String {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("bad.npy");
        std::fs::write(&path, bytes).unwrap();
        let err = read(&path)
            .expect_err("hostile file was accepted")
            .to_string();
        assert!(
            err.contains("bad.npy"),
            "message does not name the file: {err}"
        );
        assert!(!err.contains('\n'), "message spans lines: {err}");
        err
    }

    #[test]
    fn round_trips_ranks_zero_to_four() {
        let dir = TempDir::new().unwrap();
        let shapes: [&[usize]; 5] = [&[], &[5], &[2, 3], &[2, 3, 4], &[2, 1, 3, 2]];
        for shape in shapes {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.25).collect();
            let path = dir.path().join(format!("rank{}.npy", shape.len()));
            write_f32(&path, shape, &data).unwrap();
            let array = read(&path).unwrap();
            assert_eq!(array.shape, shape);
            assert_eq!(array.dtype_name(), "float32");
            assert_eq!(array.len(), n);
            assert_eq!(array.path(), path);
            assert_eq!(array.into_f32().unwrap(), data);
        }
    }

    #[test]
    fn round_trips_special_values_bit_for_bit() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("special.npy");
        let data = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            f32::MIN_POSITIVE / 2.0,
            f32::MAX,
        ];
        write_f32(&path, &[2, 3], &data).unwrap();
        let back = read(&path).unwrap().into_f32().unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&data));
    }

    #[test]
    fn written_file_is_little_endian_c_order_float32() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("layout.npy");
        write_f32(&path, &[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header = NpyHeader::from_reader(&bytes[..]).unwrap();
        assert_eq!(header.dtype(), DType::new_scalar("<f4".parse().unwrap()));
        assert_eq!(header.order(), Order::C);
        assert_eq!(header.shape(), &[2, 2]);
        assert!(bytes.ends_with(&f32_bytes(&[1.0, 2.0, 3.0, 4.0])));
        assert_eq!(bytes.len() % 16, 0, "data should start 16-byte aligned");
    }

    #[test]
    fn empty_arrays_round_trip() {
        let dir = TempDir::new().unwrap();
        let shapes: [&[usize]; 4] = [&[0], &[0, 5], &[3, 0], &[2, 0, 4]];
        for shape in shapes {
            let path = dir.path().join("empty.npy");
            write_f32(&path, shape, &[]).unwrap();
            let array = read(&path).unwrap();
            assert_eq!(array.shape, shape);
            assert!(array.is_empty());
            assert_eq!(array.into_f32().unwrap(), Vec::<f32>::new());
        }
    }

    #[test]
    fn zero_length_axis_beside_huge_axes() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("wide.npy");
        let big = 1usize << 40;
        write_f32(&path, &[0, big, big], &[]).unwrap_err();
        std::fs::write(
            &path,
            raw_npy(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 1099511627776), }",
                &[],
            ),
        )
        .unwrap();
        let array = read(&path).unwrap();
        assert_eq!(array.shape, [0, 1 << 40]);
        assert!(array.is_empty());
    }

    #[test]
    fn reads_int64_and_int32() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("ints.npy");
        let i64s = [i64::MIN, -1, 0, 1, i64::MAX, 42];
        write_with(&path, "<i8", Order::C, &[3, 2], &i64s);
        let array = read(&path).unwrap();
        assert_eq!(array.shape, [3, 2]);
        assert_eq!(array.dtype_name(), "int64");
        assert_eq!(array.data, NpyData::I64(i64s.to_vec()));

        let i32s = [i32::MIN, -7, 0, i32::MAX];
        write_with(&path, "<i4", Order::C, &[4], &i32s);
        let array = read(&path).unwrap();
        assert_eq!(array.shape, [4]);
        assert_eq!(array.dtype_name(), "int32");
        assert_eq!(array.data, NpyData::I32(i32s.to_vec()));
    }

    #[test]
    fn into_f32_refuses_integers_naming_the_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("labels.npy");
        write_with(&path, "<i8", Order::C, &[2], &[1i64, 2]);
        let err = read(&path).unwrap().into_f32().unwrap_err();
        assert_eq!(err.path(), path);
        let msg = err.to_string();
        assert!(
            msg.contains("labels.npy holds int64; expected float32"),
            "{msg}"
        );
    }

    #[test]
    fn reads_big_endian() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("be.npy");
        let f32s = [1.5f32, -2.25, 3.0e-7, 65504.0, -0.0, 7.0];
        write_with(&path, ">f4", Order::C, &[2, 3], &f32s);
        let raw = std::fs::read(&path).unwrap();
        assert!(raw.windows(4).any(|w| w == 1.5f32.to_be_bytes()));
        assert_eq!(read(&path).unwrap().into_f32().unwrap(), f32s);

        write_with(&path, ">i8", Order::C, &[2], &[-3i64, 1 << 40]);
        assert_eq!(read(&path).unwrap().data, NpyData::I64(vec![-3, 1 << 40]));

        write_with(&path, ">i4", Order::C, &[2], &[-3i32, 1 << 20]);
        assert_eq!(read(&path).unwrap().data, NpyData::I32(vec![-3, 1 << 20]));
    }

    #[test]
    fn fortran_order_is_transposed_to_c_order() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("f.npy");
        // numpy stores np.asfortranarray(np.arange(6).reshape(2, 3)) as 0 3 1 4 2 5.
        write_with(
            &path,
            "<f4",
            Order::Fortran,
            &[2, 3],
            &[0.0f32, 3.0, 1.0, 4.0, 2.0, 5.0],
        );
        let array = read(&path).unwrap();
        assert_eq!(array.shape, [2, 3]);
        assert_eq!(array.into_f32().unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);

        // Rank 3: element (i, j, k) sits at i + 2j + 6k in Fortran order.
        let shape = [2usize, 3, 4];
        let mut fortran = vec![0i32; 24];
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    fortran[i + 2 * j + 6 * k] = (100 * i + 10 * j + k) as i32;
                }
            }
        }
        write_with(&path, "<i4", Order::Fortran, &[2, 3, 4], &fortran);
        let array = read(&path).unwrap();
        assert_eq!(array.shape, shape);
        let expected: Vec<i32> = (0..2)
            .flat_map(|i| (0..3).flat_map(move |j| (0..4).map(move |k| 100 * i + 10 * j + k)))
            .collect();
        assert_eq!(array.data, NpyData::I32(expected));
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("absent.npy");
        let err = read(&path).unwrap_err();
        assert!(
            matches!(&err, NpyError::Io { error, .. } if error.kind() == io::ErrorKind::NotFound)
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("cannot open ") && msg.contains("absent.npy"),
            "{msg}"
        );
    }

    #[test]
    fn other_dtypes_are_refused_by_name() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("x.npy");
        write_with(&path, "<f8", Order::C, &[2], &[1.0f64, 2.0]);
        let msg = read(&path).unwrap_err().to_string();
        assert!(
            msg.contains("x.npy holds float64; expected float32, int64 or int32"),
            "{msg}"
        );

        write_with(&path, "|u1", Order::C, &[2], &[1u8, 2]);
        assert!(read(&path).unwrap_err().to_string().contains("holds uint8"));

        write_with(&path, "<i2", Order::C, &[1], &[1i16]);
        assert!(read(&path).unwrap_err().to_string().contains("holds int16"));

        let structured = raw_npy(
            "{'descr': [('a', '<f4'), ('b', '<i4')], 'fortran_order': False, 'shape': (1,), }",
            &[0; 8],
        );
        assert!(read_err(&structured).contains("structured dtype"));
    }

    #[test]
    fn each_input_names_the_types_it_takes() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("x.npy");
        write_with(&path, "<f8", Order::C, &[2], &[1.0f64, 2.0]);
        let msg = read_as(&path, Expected::FLOAT32).unwrap_err().to_string();
        assert!(
            msg.ends_with(
                "x.npy holds float64; expected float32 (convert with x.astype(np.float32))"
            ),
            "{msg}"
        );
        write_with(&path, "<i8", Order::C, &[2], &[1i64, 2]);
        let msg = read_as(&path, Expected::FLOAT32).unwrap_err().to_string();
        assert!(msg.contains("holds int64; expected float32 ("), "{msg}");
        assert!(read_as(&path, Expected::TARGETS).is_ok());
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let mut bytes = raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &f32_bytes(&[1.0]),
        );
        bytes[1] = b'n';
        assert!(read_err(&bytes).contains("magic"));
        assert!(read_err(b"PK\x03\x04 this is a zip").contains("magic"));
    }

    #[test]
    fn empty_and_truncated_files_are_rejected() {
        let good = raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
            &f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
        );
        read_err(&[]);
        for cut in [3, 8, 9, 10, 30, good.len() - 16, good.len() - 1] {
            read_err(&good[..cut]);
        }
    }

    #[test]
    fn header_lying_about_data_length_is_rejected() {
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        let short = read_err(&raw_npy(header, &f32_bytes(&[1.0; 5])));
        assert!(
            short.contains("promises 24 bytes") && short.contains("holds 20"),
            "{short}"
        );
        let long = read_err(&raw_npy(header, &f32_bytes(&[1.0; 7])));
        assert!(long.contains("holds 28"), "{long}");
    }

    #[test]
    fn huge_shape_on_small_file_is_rejected_before_allocating() {
        let msg = read_err(&raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }",
            &f32_bytes(&[1.0]),
        ));
        assert!(msg.contains("promises 4000000000000 bytes"), "{msg}");
        read_err(&raw_npy(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (2305843009213693952,), }",
            &[],
        ));
    }

    #[test]
    fn overflowing_shapes_are_rejected() {
        for shape in [
            "(4294967296, 4294967296)",
            "(0, 4294967296, 4294967296)",
            "(4294967296, 4294967296, 0)",
            "(18446744073709551615, 2)",
            "(18446744073709551616,)",
            "(-1, 4)",
        ] {
            let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
            let msg = read_err(&raw_npy(&header, &[]));
            assert!(msg.contains("shape"), "{shape}: {msg}");
        }
    }

    #[test]
    fn malformed_headers_are_rejected() {
        for header in [
            "{'descr': '<f4', 'fortran_order': False, }",
            "{'descr': '<f4', 'shape': (1,), }",
            "{'fortran_order': False, 'shape': (1,), }",
            "{'descr': '<f4', 'fortran_order': 'no', 'shape': (1,), }",
            "{'descr': '<q9', 'fortran_order': False, 'shape': (1,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': 1, }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1.5,), }",
            "['descr', '<f4']",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)",
            "not python at all",
        ] {
            read_err(&raw_npy(header, &f32_bytes(&[1.0])));
        }
    }

    #[test]
    fn parse_errors_stay_on_one_line_and_short() {
        let msg = read_err(&raw_npy("{'descr': '<f4', 'fortran_order'", &[]));
        assert!(msg.contains("could not parse"), "{msg}");
        let long = format!("{{'descr': '<f4', 'junk': '{}' 'x'}}", "é".repeat(5000));
        let msg = read_err(&raw_npy(&long, &[]));
        assert!(msg.chars().count() < 400, "{msg}");
    }

    #[test]
    fn deeply_nested_header_is_rejected_without_recursing() {
        let header = format!("{}{}", "(".repeat(30_000), ")".repeat(30_000));
        let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        assert!(read_err(&bytes).contains("nests deeper"));
    }

    #[test]
    fn oversized_header_length_is_rejected_before_allocating() {
        let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(b"{'descr': '<f4'");
        assert!(read_err(&bytes).contains("header claims to be 4294967295 bytes"));

        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&1000u16.to_le_bytes());
        bytes.extend_from_slice(b"{'descr': '<f4'");
        assert!(read_err(&bytes).contains("file ends inside the header"));
    }

    #[test]
    fn unsupported_version_is_rejected() {
        let mut bytes = raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &f32_bytes(&[1.0]),
        );
        bytes[6] = 9;
        assert!(read_err(&bytes).contains("version 9.0"));
    }

    #[test]
    fn version_two_and_three_headers_are_read() {
        for version in [2u8, 3] {
            let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n";
            let mut bytes = vec![0x93];
            bytes.extend_from_slice(b"NUMPY");
            bytes.extend_from_slice(&[version, 0]);
            bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&f32_bytes(&[1.0, 2.0]));
            let dir = TempDir::new().unwrap();
            let path = dir.path().join("v.npy");
            std::fs::write(&path, bytes).unwrap();
            assert_eq!(read(&path).unwrap().into_f32().unwrap(), [1.0, 2.0]);
        }
    }

    #[test]
    fn directory_instead_of_file_is_an_error() {
        let dir = TempDir::new().unwrap();
        let err = read(dir.path()).unwrap_err();
        assert_eq!(err.path(), dir.path());
        assert!(matches!(err, NpyError::Io { .. }), "{err}");
    }

    #[test]
    fn shape_mismatch_writes_nothing() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("out.npy");
        let err = write_f32(&path, &[2, 3], &[1.0; 5]).unwrap_err();
        assert!(matches!(err, NpyError::ShapeMismatch { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("out.npy") && msg.contains("(2, 3) has 6 elements but 5 values"),
            "{msg}"
        );
        let err = write_f32(&path, &[usize::MAX, 2], &[]).unwrap_err();
        assert!(err.to_string().contains("too many elements"), "{err}");
        write_f32(&path, &[], &[]).unwrap_err();
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn failed_write_leaves_no_file_and_keeps_the_old_one() {
        let dir = TempDir::new().unwrap();
        // A directory in the way is refused before anything is written.
        let blocker = dir.path().join("out.npy");
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("keep"), b"x").unwrap();
        let err = write_f32(&blocker, &[2], &[1.0, 2.0]).unwrap_err();
        assert!(
            matches!(
                err,
                NpyError::Io {
                    action: "write",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("is a directory"), "{err}");
        assert_eq!(dir_entries(dir.path()), ["out.npy"]);
        assert_eq!(dir_entries(&blocker), ["keep"]);

        let missing_dir = dir.path().join("no/such/dir/out.npy");
        let err = write_f32(&missing_dir, &[1], &[1.0]).unwrap_err();
        assert!(err.to_string().contains("no/such/dir/out.npy"), "{err}");
        assert_eq!(dir_entries(dir.path()), ["out.npy"]);
    }

    #[test]
    fn staged_files_appear_together_or_not_at_all() {
        let dir = TempDir::new().unwrap();
        let (a, b) = (dir.path().join("a.npy"), dir.path().join("b.npy"));
        let staged = stage_f32(&a, &[1], &[1.0]).unwrap();
        assert!(!a.exists());
        drop(staged);
        assert!(dir_entries(dir.path()).is_empty());
        commit_all([
            stage_f32(&a, &[1], &[1.0]).unwrap(),
            stage_f32(&b, &[2], &[2.0, 3.0]).unwrap(),
        ])
        .unwrap();
        assert_eq!(dir_entries(dir.path()), ["a.npy", "b.npy"]);
        assert_eq!(read(&b).unwrap().into_f32().unwrap(), [2.0, 3.0]);
        assert!(same_file(&a, &dir.path().join(".").join("a.npy")));
        assert!(!same_file(&a, &b));
    }

    #[test]
    fn overwrite_replaces_previous_contents() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("out.npy");
        write_f32(&path, &[3], &[1.0, 2.0, 3.0]).unwrap();
        write_f32(&path, &[1, 1], &[9.0]).unwrap();
        let array = read(&path).unwrap();
        assert_eq!(array.shape, [1, 1]);
        assert_eq!(array.into_f32().unwrap(), [9.0]);
        assert_eq!(dir_entries(dir.path()), ["out.npy"]);
    }

    #[cfg(unix)]
    #[test]
    fn written_file_is_not_private_to_the_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("out.npy");
        let reference = dir.path().join("reference");
        File::create(&reference).unwrap();
        write_f32(&path, &[1], &[1.0]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&reference));
    }

    #[test]
    fn temporary_goes_beside_the_target() {
        // A bare file name has an empty parent, which tempfile cannot create a file in.
        assert_eq!(directory_of(Path::new("plain.npy")), Path::new("."));
        assert_eq!(directory_of(Path::new("out/plain.npy")), Path::new("out"));
        assert_eq!(directory_of(Path::new("/plain.npy")), Path::new("/"));
    }

    fn valid_file_bytes() -> Vec<u8> {
        raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        )
    }

    /// Reads `bytes` from a file; any outcome but a panic (or abort) is acceptable, and an
    /// accepted file must be self-consistent.
    fn read_must_not_panic(bytes: &[u8]) -> Result<(), TestCaseError> {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("fuzz.npy");
        std::fs::write(&path, bytes).unwrap();
        match read(&path) {
            Ok(array) => {
                prop_assert_eq!(array.len(), array.shape.iter().product::<usize>());
                prop_assert!(array.len() * 4 <= bytes.len());
            }
            Err(err) => {
                let msg = err.to_string();
                prop_assert!(msg.contains("fuzz.npy"), "{}", msg);
                prop_assert!(!msg.contains('\n'), "{}", msg);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn fuzz_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            read_must_not_panic(&bytes)?;
            let mut with_magic = b"\x93NUMPY".to_vec();
            with_magic.extend_from_slice(&bytes);
            read_must_not_panic(&with_magic)?;
        }

        #[test]
        fn fuzz_mutated_valid_file(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = valid_file_bytes();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            read_must_not_panic(&bytes)?;
        }

        #[test]
        fn fuzz_mutated_header_text(
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), prop::sample::select(
                    b"0123456789()[]{},:' <>|=fibuOV-xe".to_vec()
                )),
                1..6,
            ),
        ) {
            let bytes = valid_file_bytes();
            let text_end = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            let mut bytes = bytes;
            for (at, value) in edits {
                let i = 10 + at.index(text_end - 10);
                bytes[i] = value;
            }
            read_must_not_panic(&bytes)?;
        }

        #[test]
        fn fuzz_generated_headers(
            descr in prop_oneof![
                prop::sample::select(vec!["<f4", ">f4", "<i8", ">i4", "<f8", "|u1", "|b1", "<c8", "|O"])
                    .prop_map(str::to_owned),
                "[<>|=]?[fiubcO][0-9]{0,3}",
            ],
            fortran in prop::sample::select(vec!["True", "False", "1", "None"]),
            shape in prop::collection::vec(
                prop_oneof![
                    Just("0".to_owned()),
                    (0u64..5).prop_map(|d| d.to_string()),
                    any::<u64>().prop_map(|d| d.to_string()),
                    Just("-1".to_owned()),
                    Just("99999999999999999999999".to_owned()),
                ],
                0..5,
            ),
            data_len in 0usize..128,
        ) {
            let header = format!(
                "{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': ({}), }}",
                shape.iter().map(|d| format!("{d},")).collect::<String>(),
            );
            read_must_not_panic(&raw_npy(&header, &vec![0x3f; data_len]))?;
        }

        #[test]
        fn round_trip_any_shape(shape in prop::collection::vec(0usize..4, 0..5), seed in any::<u32>()) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| f32::from_bits(seed.wrapping_add((i as u32).wrapping_mul(2_654_435_761)))).collect();
            let dir = TempDir::new().unwrap();
            let path = dir.path().join("p.npy");
            write_f32(&path, &shape, &data).unwrap();
            let array = read(&path).unwrap();
            prop_assert_eq!(&array.shape, &shape);
            let back = array.into_f32().unwrap();
            prop_assert_eq!(
                back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
