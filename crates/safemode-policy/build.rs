//! Embeds the standard modes (`runbooks/modes/*.yaml`) and runbooks
//! (`runbooks/*.yaml`, at the top of the repository) so that every binary
//! serves them wherever it runs.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let runbooks = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?)
        .join("../../runbooks")
        .canonicalize()?;
    embed_yaml_files(
        &runbooks.join("modes"),
        &out_dir.join("standard_modes.rs"),
        "STANDARD_MODES",
        "The standard modes",
    )?;
    // Only the files directly in runbooks/: the modes below it are embedded
    // above.
    embed_yaml_files(
        &runbooks,
        &out_dir.join("standard_runbooks.rs"),
        "STANDARD_RUNBOOKS",
        "The standard runbooks",
    )?;
    Ok(())
}

/// Writes to `out` a constant `name` listing every `*.yaml` file directly in
/// `dir` as (file name, YAML text), in file-name order.
fn embed_yaml_files(
    dir: &std::path::Path,
    out: &std::path::Path,
    name: &str,
    doc: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    let mut code =
        format!("/// {doc}: (file name, YAML text).\npub const {name}: &[(&str, &str)] = &[\n");
    for path in files {
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("YAML file name is not UTF-8")?;
        code.push_str(&format!(
            "    ({file:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    }
    code.push_str("];\n");
    std::fs::write(out, code)?;
    Ok(())
}
