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
    // Again when the commit or the tree changes: a new commit moves HEAD's
    // branch (or HEAD itself), staging moves the index, and an edit anywhere
    // in the sources makes the tree dirty.
    let mut watched = vec![
        "src".to_string(),
        "crates".to_string(),
        "Cargo.toml".to_string(),
        "Cargo.lock".to_string(),
    ];
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        watched.push(format!("{dir}/HEAD"));
        watched.push(format!("{dir}/index"));
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.extend(git(&["rev-parse", "--git-path", &reference]));
        watched.extend(git(&["rev-parse", "--git-path", "packed-refs"]));
    }
    for path in watched {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
