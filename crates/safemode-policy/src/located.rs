//! The one error every safemode file loader reports: a problem at a file,
//! line and column, shown as `file:line:column: message`, the form editors
//! and terminals jump to.
//!
//! Mode and runbook files report it as it is (`ModeFileError` and
//! `RunbookFileError` are its names there), the tokens file converts it into
//! its own error, and the catalogue gathers it from whole directories. One
//! type means one place that reads a position out of the YAML library and
//! rewords its messages, so no loader prints a position twice or shows the
//! library's advice about its own options.

use serde_saphyr::Location;

use super::mode_file::MAX_YAML_DEPTH;

/// A problem in a file, with where it is and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct LocatedError {
    /// The file as the caller named it.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
    /// What is wrong and what to do.
    pub message: String,
}

impl LocatedError {
    /// A problem in `file` at the value the YAML library placed at `at`.
    pub fn new(file: impl Into<String>, at: Location, message: impl Into<String>) -> Self {
        // The library keeps lines and columns as `u32`, so neither saturates.
        let line = u32::try_from(at.line()).unwrap_or(u32::MAX);
        let column = u32::try_from(at.column()).unwrap_or(u32::MAX);
        Self::at(file, line, column, message)
    }

    /// A problem in `file` at `line` and `column` (1-based). The message is
    /// made one line: a value it quotes from the file may hold line breaks
    /// or other control characters, shown escaped (`\n`), so that one
    /// problem is always one line of output.
    pub fn at(file: impl Into<String>, line: u32, column: u32, message: impl Into<String>) -> Self {
        LocatedError {
            file: file.into(),
            line,
            column,
            message: one_line(message.into()),
        }
    }

    /// A problem with `file` as a whole (its name, its emptiness), placed at
    /// its start.
    pub fn at_start(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self::at(file, 1, 1, message)
    }

    /// The YAML library's error for `file`: at its position (the file's
    /// start when it has none), reworded by [`library_message`].
    pub fn from_yaml(file: impl Into<String>, error: &serde_saphyr::Error) -> Self {
        let message = library_message(&error.to_string());
        match error.location() {
            Some(at) => Self::new(file, at, message),
            None => Self::at_start(file, message),
        }
    }
}

/// The YAML library's message, reworded for a person editing a safemode
/// file: without the position (the [`LocatedError`] prints its own) or the
/// source excerpt, and without advice about the library's options.
pub(crate) fn library_message(raw: &str) -> String {
    let first = raw
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    let mut message = match first.strip_prefix("line ") {
        Some(rest) => rest.split_once(": ").map_or(first, |(_, m)| m),
        None => first,
    };
    if let Some(at) = message.find(" at line ") {
        message = &message[..at];
    }
    if message.starts_with("budget breached: Depth") {
        return format!(
            "nested deeper than {MAX_YAML_DEPTH} levels of maps and lists, which no valid file needs; check the indentation and brackets here"
        );
    }
    let message = message.replace(
        ", set DuplicateKeyPolicy in Options if acceptable",
        "; each key may appear once",
    );
    match message.strip_suffix(", expected one of ") {
        Some(field) => format!("{field}; this takes no fields"),
        None => message,
    }
}

/// `message` with its control characters and line or paragraph separators
/// escaped as Rust writes them (`\n`, `\u{2028}`); unchanged, without a
/// copy, when it has none.
fn one_line(message: String) -> String {
    let breaks = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !message.contains(breaks) {
        return message;
    }
    message
        .chars()
        .map(|c| {
            if breaks(c) {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_quoted_with_line_breaks_stays_one_line() {
        let e = LocatedError::at(
            "r.yaml",
            23,
            18,
            "bad duration '15m\n- more\r\u{2028}' here",
        );
        assert_eq!(e.message, "bad duration '15m\\n- more\\r\\u{2028}' here");
        assert_eq!(e.to_string().lines().count(), 1);
    }
}
