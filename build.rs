//! Records the commit the binaries are built from (`git describe --always
//! --dirty` of the tree at build time) as `SAFEMODE_BUILD_COMMIT`, so that
//! the benchmark's JSON names the code it measured, not whatever the tree
//! holds when it runs. `unknown` outside a Git checkout.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    Some(text.lines().next()?.trim().to_string()).filter(|line| !line.is_empty())
}

fn main() {
    let commit = git(&["describe", "--always", "--dirty"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SAFEMODE_BUILD_COMMIT={commit}");
    // Again when the commit or the tree changes: every move of HEAD (a
    // commit, an amend, a reset, a checkout) adds a line to HEAD's reflog,
    // and an edit to anything built into the binaries makes the tree dirty.
    // Not the index, which `git status` (and this script's own `git
    // describe`) rewrite without changing either.
    let mut watched: Vec<String> = [
        "src",
        "crates",
        "proto",
        "runbooks",
        "Cargo.toml",
        "Cargo.lock",
    ]
    .map(String::from)
    .to_vec();
    for file in ["HEAD", "logs/HEAD"] {
        watched.extend(git(&["rev-parse", "--git-path", file]));
    }
    for path in watched {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
