//! Shared support for the end-to-end suites and the programs behind `cargo xtask
//! conformance` and `cargo xtask bench`.

pub mod load;
pub mod nats;
pub mod proxy;
pub mod unified;
pub mod verify;
pub mod workload;

/// The program `name` built beside the running one (in the same target directory), or an
/// error naming it and `built_by`, the command that builds it.
///
/// # Errors
/// When the program is not there.
pub fn program_beside(name: &str, built_by: &str) -> Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} does not exist: build it first ({built_by})",
            path.display()
        ))
    }
}
