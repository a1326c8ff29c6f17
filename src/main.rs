//! The `safemode` command: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    safemode::cli::main()
}
