//! One error type for the whole engine. Every variant renders as a sentence a user can act on;
//! nothing in the library panics on bad input.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid safetensors file: {reason}")]
    CorruptFile { path: PathBuf, reason: String },

    #[error("{path}: missing tensor `{key}`")]
    MissingKey { path: PathBuf, key: String },

    #[error("{path}: tensor `{key}` has shape {got:?}, expected {expected:?}")]
    WrongShape { path: PathBuf, key: String, expected: Vec<usize>, got: Vec<usize> },

    #[error("{path}: tensor `{key}` has unsupported dtype {dtype}")]
    UnsupportedDType { path: PathBuf, key: String, dtype: String },

    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("shape error in {op}: {reason}")]
    Shape { op: &'static str, reason: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("{0}")]
    Unsupported(String),

    #[error("GPU error: {0}")]
    Gpu(String),

    #[error("out of device memory: {0}")]
    OutOfMemory(String),

    /// NaN or ±inf where a finite value must be (a stage's output, an op's under `--debug-nans`).
    #[error("{0}")]
    NonFinite(String),

    /// The caller stopped the run (a server's client went away).
    #[error("cancelled")]
    Cancelled,

    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn shape(op: &'static str, reason: impl Into<String>) -> Self {
        Error::Shape { op, reason: reason.into() }
    }

    pub fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Config { path: path.into(), reason: reason.into() }
    }
}

/// Early-return an `Error::InvalidArgument` built with `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::InvalidArgument(format!($($arg)*)))
    };
}
