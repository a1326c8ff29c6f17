//! Loading the mode and runbook catalogues: the standard modes and runbooks
//! built into the binary (from `runbooks/modes/` and `runbooks/`), or every
//! `*.yaml` file of a directory (`safemode serve --modes DIR`); and linting
//! runbook files and directories (`safemode runbook lint`). Parsing itself is
//! in the policy core; this module reads files and gathers every error rather
//! than stopping at the first, so one run shows everything to fix.
//!
//! A [`Catalog`] carries a fingerprint of the files it came from: every
//! replica must serve the same files, whatever binary version reads them.

use std::path::{Path, PathBuf};

use crate::located::LocatedError;
use crate::{
    Expectations, Mode, ModeCatalog, Runbook, RunbookCatalog, lint_runbook, parse_mode,
    parse_runbook, parse_runbook_checking,
};

include!(concat!(env!("OUT_DIR"), "/standard_modes.rs"));
include!(concat!(env!("OUT_DIR"), "/standard_runbooks.rs"));

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
    Invalid(Vec<LocatedError>),
    /// The directory holds no mode files.
    #[error("{0} holds no *.yaml mode files")]
    Empty(String),
    /// One or more runbook files are invalid; each error has file, line and
    /// column.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    InvalidRunbooks(Vec<LocatedError>),
    /// The directory holds no runbook files.
    #[error("{0} holds no *.yaml runbook files")]
    NoRunbooks(String),
}

impl CatalogError {
    /// One line per problem, each naming its file (and line and column
    /// where there is one).
    pub fn lines(&self) -> Vec<String> {
        match self {
            CatalogError::Invalid(errors) => errors.iter().map(ToString::to_string).collect(),
            CatalogError::InvalidRunbooks(errors) => {
                errors.iter().map(ToString::to_string).collect()
            }
            other => vec![other.to_string()],
        }
    }
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

fn read_err(path: &Path, source: std::io::Error) -> CatalogError {
    CatalogError::Read {
        path: path.display().to_string(),
        source,
    }
}

/// The `*.yaml` and `*.yml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, CatalogError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
        let path = entry.map_err(|e| read_err(dir, e))?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The file's stem, which names the mode or runbook in it.
fn stem(path: &Path) -> &str {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
}

/// Loads every `*.yaml` file in `dir` as a mode named after the file.
pub fn load_modes_dir(dir: &Path) -> Result<ModeCatalog, CatalogError> {
    let files = yaml_files(dir)?;
    if files.is_empty() {
        return Err(CatalogError::Empty(dir.display().to_string()));
    }
    let mut modes = Vec::new();
    let mut errors = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
        match parse_mode(&path.display().to_string(), stem(&path), &text) {
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
        CatalogError::Invalid(vec![LocatedError::at_start(
            dir.display().to_string(),
            dup.to_string(),
        )])
    })
}

// === The catalogue a replica serves ===

/// The modes and runbooks a replica serves, and the fingerprint of the files
/// they came from: every replica must serve the same.
pub struct Catalog {
    /// The modes.
    pub modes: ModeCatalog,
    /// The runbooks.
    pub runbooks: RunbookCatalog,
    /// SHA-256 (hex) of the files' names and contents.
    pub fingerprint: String,
}

impl Catalog {
    /// The built-in standard modes and runbooks.
    pub fn standard() -> Catalog {
        let modes = standard_modes();
        let runbooks = standard_runbooks(&modes);
        let fingerprint = fingerprint(&embedded(STANDARD_MODES), &embedded(STANDARD_RUNBOOKS));
        Catalog {
            modes,
            runbooks,
            fingerprint,
        }
    }

    /// Modes from `modes_dir` and runbooks from `runbooks_dir`; the built-in
    /// ones for either that is `None`. Runbooks are checked against the
    /// modes.
    pub fn load(
        modes_dir: Option<&Path>,
        runbooks_dir: Option<&Path>,
    ) -> Result<Catalog, CatalogError> {
        Catalog::load_checking(modes_dir, runbooks_dir, Expectations::MustHold)
    }

    /// [`Catalog::load`], with the runbooks in `runbooks_dir` checked as
    /// `expectations` says (the built-in ones always hold).
    pub fn load_checking(
        modes_dir: Option<&Path>,
        runbooks_dir: Option<&Path>,
        expectations: Expectations,
    ) -> Result<Catalog, CatalogError> {
        let (modes, mode_files) = match modes_dir {
            None => (standard_modes(), embedded(STANDARD_MODES)),
            Some(dir) => (load_modes_dir(dir)?, dir_files(dir)?),
        };
        let (runbooks, runbook_files) = match runbooks_dir {
            None => (try_standard_runbooks(&modes)?, embedded(STANDARD_RUNBOOKS)),
            Some(dir) => (
                load_runbooks_dir_checking(dir, &modes, expectations)?,
                dir_files(dir)?,
            ),
        };
        Ok(Catalog {
            fingerprint: fingerprint(&mode_files, &runbook_files),
            modes,
            runbooks,
        })
    }
}

/// (file name, text) of built-in files.
fn embedded(files: &[(&str, &str)]) -> Vec<(String, String)> {
    files
        .iter()
        .map(|(name, text)| (name.to_string(), text.to_string()))
        .collect()
}

/// (file name, text) of the YAML files directly in `dir`.
fn dir_files(dir: &Path) -> Result<Vec<(String, String)>, CatalogError> {
    yaml_files(dir)?
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            Ok((name, text))
        })
        .collect()
}

/// SHA-256 over the mode files and the runbook files, each sorted by name,
/// names and contents length-prefixed so that no two sets hash alike.
fn fingerprint(modes: &[(String, String)], runbooks: &[(String, String)]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (kind, files) in [("modes", modes), ("runbooks", runbooks)] {
        let mut files: Vec<&(String, String)> = files.iter().collect();
        files.sort();
        hasher.update(format!("{kind}:{}\n", files.len()));
        for (name, text) in files {
            hasher.update(format!("{}:{name}{}:", name.len(), text.len()));
            hasher.update(text.as_bytes());
        }
    }
    format!("{:x}", hasher.finalize())
}

// === Runbooks ===

/// The standard runbooks shipped with safemode, checked against `modes`
/// (normally [`standard_modes`]). Panics if one does not parse: the test
/// suite lints them, so that means the binary was built from a broken tree,
/// or `modes` lacks a standard mode (use [`try_standard_runbooks`] with a
/// catalogue of your own).
pub fn standard_runbooks(modes: &ModeCatalog) -> RunbookCatalog {
    try_standard_runbooks(modes).unwrap_or_else(|e| {
        panic!("a standard runbook does not parse (the test suite lints these):\n{e}")
    })
}

/// The standard runbooks checked against `modes`, with every error if a
/// stage names a mode `modes` does not have or an expectation does not hold
/// under `modes`' versions of its modes.
pub fn try_standard_runbooks(modes: &ModeCatalog) -> Result<RunbookCatalog, CatalogError> {
    let mut runbooks = Vec::new();
    let mut errors = Vec::new();
    for (file, text) in STANDARD_RUNBOOKS {
        let name = file.trim_end_matches(".yaml");
        match parse_runbook(&format!("runbooks/{file}"), name, text, modes) {
            Ok(runbook) => runbooks.push(runbook),
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        return Err(CatalogError::InvalidRunbooks(errors));
    }
    Ok(RunbookCatalog::new(runbooks).expect("standard runbook names are file names, hence unique"))
}

/// Loads every `*.yaml` file directly in `dir` as the runbook for the
/// incident type named after the file, checked against `modes`. Every error
/// of every file is reported.
pub fn load_runbooks_dir(dir: &Path, modes: &ModeCatalog) -> Result<RunbookCatalog, CatalogError> {
    load_runbooks_dir_checking(dir, modes, Expectations::MustHold)
}

/// [`load_runbooks_dir`], with the expectations checked as `expectations`
/// says.
pub fn load_runbooks_dir_checking(
    dir: &Path,
    modes: &ModeCatalog,
    expectations: Expectations,
) -> Result<RunbookCatalog, CatalogError> {
    let files = yaml_files(dir)?;
    if files.is_empty() {
        return Err(CatalogError::NoRunbooks(dir.display().to_string()));
    }
    let mut runbooks = Vec::new();
    let mut errors = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
        let file = path.display().to_string();
        match parse_runbook_checking(&file, stem(&path), &text, modes, expectations) {
            Ok(runbook) => runbooks.push(runbook),
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        return Err(CatalogError::InvalidRunbooks(errors));
    }
    // Only `x.yaml` beside `x.yml` can share a name.
    RunbookCatalog::new(runbooks).map_err(|dup| {
        CatalogError::InvalidRunbooks(vec![LocatedError::at_start(
            dir.display().to_string(),
            dup.to_string(),
        )])
    })
}

/// Lints runbooks for `safemode runbook lint PATH...`: each path is a
/// runbook file or a directory of them. A directory's runbooks are checked
/// against the modes in its `modes/` subdirectory when it has one (those
/// mode files are linted too), else against `modes`; a directory or file
/// under a directory named `modes` is linted as mode files. Returns how many
/// files were checked, or every error, one line each
/// (`file:line:column: message`).
pub fn lint(paths: &[PathBuf], modes: &ModeCatalog) -> Result<usize, Vec<String>> {
    let mut lint = Lint::default();
    for path in paths {
        let in_modes_dir = |p: &Path| p.file_name().is_some_and(|n| n == "modes");
        if path.is_dir() {
            if in_modes_dir(path) {
                lint.modes_dir(path);
            } else {
                lint.runbooks_dir(path, modes);
            }
        } else if path.parent().is_some_and(in_modes_dir) {
            lint.mode_file(path);
        } else {
            lint.runbook_file(path, modes);
        }
    }
    if lint.errors.is_empty() {
        Ok(lint.checked)
    } else {
        Err(lint.errors)
    }
}

/// What a lint run has found so far.
#[derive(Default)]
struct Lint {
    checked: usize,
    errors: Vec<String>,
}

impl Lint {
    fn read(&mut self, path: &Path) -> Option<String> {
        self.checked += 1;
        std::fs::read_to_string(path)
            .map_err(|e| self.errors.push(read_err(path, e).to_string()))
            .ok()
    }

    fn files(&mut self, dir: &Path) -> Vec<PathBuf> {
        yaml_files(dir).unwrap_or_else(|e| {
            self.errors.push(e.to_string());
            Vec::new()
        })
    }

    fn mode_file(&mut self, path: &Path) -> Option<Mode> {
        let text = self.read(path)?;
        parse_mode(&path.display().to_string(), stem(path), &text)
            .map_err(|e| self.errors.push(e.to_string()))
            .ok()
    }

    /// Lints the mode files of `dir`; the catalogue of those that parse.
    fn modes_dir(&mut self, dir: &Path) -> ModeCatalog {
        let files = self.files(dir);
        if files.is_empty() {
            self.errors
                .push(CatalogError::Empty(dir.display().to_string()).to_string());
        }
        let mut modes: Vec<Mode> = Vec::new();
        for path in files {
            if let Some(mode) = self.mode_file(&path) {
                if modes.iter().any(|m| m.name == mode.name) {
                    let twice = LocatedError::at_start(
                        path.display().to_string(),
                        format!(
                            "mode '{}' is defined twice; every mode needs its own name",
                            mode.name
                        ),
                    );
                    self.errors.push(twice.to_string());
                    continue;
                }
                modes.push(mode);
            }
        }
        ModeCatalog::new(modes).expect("duplicates were left out")
    }

    fn runbook_file(&mut self, path: &Path, modes: &ModeCatalog) -> Option<Runbook> {
        let text = self.read(path)?;
        lint_runbook(&path.display().to_string(), stem(path), &text, modes)
            .map_err(|errors| self.errors.extend(errors.iter().map(ToString::to_string)))
            .ok()
    }

    fn runbooks_dir(&mut self, dir: &Path, modes: &ModeCatalog) {
        let modes_dir = dir.join("modes");
        let local;
        let modes = if modes_dir.is_dir() {
            local = self.modes_dir(&modes_dir);
            &local
        } else {
            modes
        };
        let files = self.files(dir);
        if files.is_empty() && !modes_dir.is_dir() {
            self.errors
                .push(CatalogError::NoRunbooks(dir.display().to_string()).to_string());
        }
        let mut names: Vec<String> = Vec::new();
        for path in files {
            if let Some(runbook) = self.runbook_file(&path, modes) {
                if names.contains(&runbook.name.to_string()) {
                    let twice = LocatedError::at_start(
                        path.display().to_string(),
                        format!(
                            "runbook '{}' is defined twice; every incident type needs its own runbook",
                            runbook.name
                        ),
                    );
                    self.errors.push(twice.to_string());
                }
                names.push(runbook.name.to_string());
            }
        }
    }
}
