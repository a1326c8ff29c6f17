//! Loading the mode catalogue: the standard modes built into the binary (from
//! `runbooks/modes/`), or every `*.yaml` file of a directory given to
//! `safemode serve --modes DIR`. Parsing itself is in the policy core; this
//! module reads files and gathers every error rather than stopping at the
//! first, so one run shows everything to fix.

use std::path::Path;

use crate::policy::{ModeCatalog, ModeFileError, parse_mode};

include!(concat!(env!("OUT_DIR"), "/standard_modes.rs"));

/// Why a catalogue could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The directory or a file in it could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// What could not be read.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// One or more files are invalid; each error has file, line and column.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ModeFileError>),
    /// The directory holds no mode files.
    #[error("{0} holds no *.yaml mode files")]
    Empty(String),
}

/// The standard modes shipped with safemode.
pub fn standard_modes() -> ModeCatalog {
    let modes = STANDARD_MODES.iter().map(|(file, text)| {
        let name = file.trim_end_matches(".yaml");
        parse_mode(&format!("runbooks/modes/{file}"), name, text).unwrap_or_else(|e| {
            panic!("a standard mode does not parse (the test suite lints these): {e}")
        })
    });
    ModeCatalog::new(modes).expect("standard mode names are file names, hence unique")
}

/// Loads every `*.yaml` file in `dir` as a mode named after the file.
pub fn load_modes_dir(dir: &Path) -> Result<ModeCatalog, CatalogError> {
    let read_err = |path: &Path, source| CatalogError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
        let path = entry.map_err(|e| read_err(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(CatalogError::Empty(dir.display().to_string()));
    }
    let mut modes = Vec::new();
    let mut errors = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        match parse_mode(&path.display().to_string(), name, &text) {
            Ok(mode) => modes.push(mode),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(CatalogError::Invalid(errors));
    }
    // File stems in one directory are unique, so names are too, except for
    // `x.yaml` beside `x.yml`.
    ModeCatalog::new(modes).map_err(|dup| {
        CatalogError::Invalid(vec![ModeFileError {
            file: dir.display().to_string(),
            line: 1,
            column: 1,
            message: dup.to_string(),
        }])
    })
}
