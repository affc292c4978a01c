//! Where the binaries under test are: `HOBOTNICA_BIN_DIR`, else the cargo
//! profile directory the test executable was built into
//! (`target/<profile>/deps/<test>` → `target/<profile>/<bin>`).

use std::path::PathBuf;

/// The controller binary's name.
pub const CONTROLLER: &str = "hobotnica-controller";
/// The agent binary's name.
pub const AGENT: &str = "hobotnica-agent";
/// The CLI binary's name.
pub const HOBOT: &str = "hobot";

/// The directory holding the binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HOBOTNICA_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the test executable's directory");
    if deps.file_name().is_some_and(|name| name == "deps") {
        deps.parent().expect("the profile directory").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The path of binary `name`.
///
/// # Panics
/// When it was not built, naming the command that builds it.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found. Build the binaries first: `cargo build --workspace --bins` \
         (add `--release` for `cargo bench`), or set HOBOTNICA_BIN_DIR",
        path.display()
    );
    path
}
