//! Files only their owner may read. Secrets given as files (`--token-file`
//! and the like) are read by [`read_secret_file`], which refuses a file that
//! its group or other users may read; the directories and files Hobotnica
//! keeps for itself are created 0700 and 0600 whatever the umask, and made
//! so again when an older version left them looser.
//!
//! The one module of this crate that touches the file system: the
//! controller, the agent and `hobot` share these rules.

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Mode of the directories Hobotnica creates for itself.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of the files Hobotnica creates for itself.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Permission bits of the group and of other users.
const GROUP_AND_OTHER_BITS: u32 = 0o077;
/// Largest secret file read, in bytes: a file holds one token or URL.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// A secret's text, such as a token. `Debug` prints `[REDACTED]`; there is
/// no `Display`, so it cannot slip into a message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret itself, for hashing or sending; never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// For clap's `value_parser`: any string.
    pub fn parse(text: &str) -> Result<Secret, std::convert::Infallible> {
        Ok(Secret::new(text))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Why a secret file was not read. Messages name the option and the file,
/// never what it holds.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read the {option} file {}", path.display())]
    Unreadable {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the {option} file {} is not a regular file", path.display())]
    NotAFile { option: &'static str, path: PathBuf },
    #[error(
        "refusing the {option} file {path}: its mode {mode:04o} lets other users read it; run: chmod 600 {path}",
        path = path.display()
    )]
    ReadableByOthers {
        option: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("the {option} file {} is larger than {MAX_SECRET_FILE_BYTES} bytes", path.display())]
    TooLarge { option: &'static str, path: PathBuf },
    #[error("the {option} file {} is not UTF-8 text", path.display())]
    NotText { option: &'static str, path: PathBuf },
    #[error("the {option} file {} is empty", path.display())]
    Empty { option: &'static str, path: PathBuf },
}

/// The start-up warning for a secret given on the command line as `option`
/// (what it is, and the file option and variable to use instead).
pub fn command_line_warning(what: &str, option: &str, file_option: &str, env: &str) -> String {
    format!(
        "{what} was given with {option} on the command line, where every process on this \
         host (jobs too) can read it in /proc/<pid>/cmdline; use {file_option} FILE (mode \
         0600) or {env} instead"
    )
}

/// Reads the secret in `path`, given by `option` (for messages): the file
/// must be a regular file of mode 0600 or stricter (no group or other
/// bits), UTF-8 and not empty; trailing line breaks are dropped. The mode is
/// checked on the opened file, so the file read is the file checked.
pub fn read_secret_file(option: &'static str, path: &Path) -> Result<Secret, SecretFileError> {
    let unreadable = |source| SecretFileError::Unreadable {
        option,
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(unreadable)?;
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(SecretFileError::NotAFile {
            option,
            path: path.to_owned(),
        });
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & GROUP_AND_OTHER_BITS != 0 {
        return Err(SecretFileError::ReadableByOthers {
            option,
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(SecretFileError::TooLarge {
            option,
            path: path.to_owned(),
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| SecretFileError::NotText {
        option,
        path: path.to_owned(),
    })?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(SecretFileError::Empty {
            option,
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(secret))
}

/// A permission change made to a path that was open to other users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeChange {
    pub path: PathBuf,
    pub old_mode: u32,
    pub new_mode: u32,
}

impl fmt::Display for ModeChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04o} -> {:04o}",
            self.path.display(),
            self.old_mode,
            self.new_mode
        )
    }
}

/// Takes the group and other bits off `path` (not following a symbolic
/// link, whose own mode means nothing). Returns the change, if one was made.
pub fn make_private(path: &Path) -> io::Result<Option<ModeChange>> {
    let metadata = std::fs::symlink_metadata(path)?;
    if metadata.file_type().is_symlink() {
        return Ok(None);
    }
    let old_mode = metadata.permissions().mode() & 0o7777;
    if old_mode & GROUP_AND_OTHER_BITS == 0 {
        return Ok(None);
    }
    let new_mode = old_mode & !GROUP_AND_OTHER_BITS;
    std::fs::set_permissions(path, Permissions::from_mode(new_mode))?;
    Ok(Some(ModeChange {
        path: path.to_owned(),
        old_mode,
        new_mode,
    }))
}

/// Creates `dir` and any missing parents with mode 0700, or takes the group
/// and other bits off it if it exists. Returns the change made to an
/// existing `dir`, if any.
pub fn create_private_dir(dir: &Path) -> io::Result<Option<ModeChange>> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)?;
    // `dir` may be a link to a directory: its target is what must be private.
    let target = std::fs::canonicalize(dir)?;
    make_private(&target)
}

/// Makes `dir` and everything in it private (see [`make_private`]), not
/// following symbolic links. Returns the changes made.
pub fn make_tree_private(dir: &Path) -> io::Result<Vec<ModeChange>> {
    let mut changes = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        changes.extend(make_private(&path)?);
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(changes)
}

/// Options that create a file with mode 0600 (an existing file keeps its
/// mode: see [`write_private_file`]).
pub fn private_open_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(PRIVATE_FILE_MODE);
    options
}

/// Replaces `path` with a file holding `contents`, mode 0600 (also when it
/// existed with another mode). Atomic: the contents go to a temporary file
/// beside it, flushed to disk, which is then renamed over `path`, so a
/// reader (hobot reading `controller.json` while the controller starts, a
/// health check reading the agent's status) or a crash never sees a file
/// half written or empty.
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a file path has a name"))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(format!(".{}.tmp", std::process::id()));
    let temporary = path.with_file_name(temporary_name);
    // A leftover of a crash goes first; create_new (O_EXCL) never follows a
    // link planted at the temporary name.
    let _ = std::fs::remove_file(&temporary);
    let written = (|| {
        let mut file = private_open_options()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        file.set_permissions(Permissions::from_mode(PRIVATE_FILE_MODE))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_never_sees_a_private_file_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.json");
        write_private_file(&path, b"first\n").unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, done) = (path.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let text = std::fs::read(&path).unwrap();
                    assert!(text.ends_with(b"\n"), "read {text:?}");
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..2000 {
            write_private_file(&path, format!("{i:0>4096}\n").as_bytes()).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
    }

    fn secret_file(dir: &Path, contents: &[u8], mode: u32) -> PathBuf {
        let path = dir.join("token");
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
        path
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn a_0600_file_is_read_without_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        for (contents, mode) in [
            (&b"hbag_secret\n"[..], 0o600),
            (b"hbag_secret", 0o400),
            (b"hbag_secret\r\n", 0o600),
            (b"hbag_secret\n\n", 0o700),
        ] {
            let path = secret_file(dir.path(), contents, mode);
            let secret = read_secret_file("--token-file", &path).unwrap();
            assert_eq!(secret.expose(), "hbag_secret", "{contents:?}");
        }
    }

    #[test]
    fn a_file_others_may_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o644, 0o604, 0o610, 0o601] {
            let path = secret_file(dir.path(), b"hbag_topsecret\n", mode);
            let error = read_secret_file("--token-file", &path).unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(error, SecretFileError::ReadableByOthers { .. }),
                "{message}"
            );
            assert!(
                message.contains(&format!("{mode:04o}"))
                    && message.contains(&format!("chmod 600 {}", path.display()))
                    && message.contains("--token-file"),
                "{message}"
            );
            assert!(!message.contains("topsecret"), "{message}");
            assert!(!message.contains('\n'), "one line: {message}");
        }
    }

    #[test]
    fn missing_empty_and_odd_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let message = read_secret_file("--token-file", &missing)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("cannot read the --token-file file")
                && message.contains(&missing.display().to_string()),
            "{message}"
        );

        for contents in [&b""[..], b"\n", b"\r\n\n"] {
            let path = secret_file(dir.path(), contents, 0o600);
            let error = read_secret_file("--token-file", &path).unwrap_err();
            assert!(matches!(error, SecretFileError::Empty { .. }), "{error}");
        }

        let path = secret_file(dir.path(), b"\xffsecret", 0o600);
        let error = read_secret_file("--token-file", &path).unwrap_err();
        assert!(matches!(error, SecretFileError::NotText { .. }), "{error}");

        let big = vec![b'a'; usize::try_from(MAX_SECRET_FILE_BYTES).unwrap() + 1];
        let path = secret_file(dir.path(), &big, 0o600);
        let error = read_secret_file("--token-file", &path).unwrap_err();
        assert!(matches!(error, SecretFileError::TooLarge { .. }), "{error}");

        let error = read_secret_file("--token-file", dir.path()).unwrap_err();
        assert!(
            matches!(
                error,
                SecretFileError::NotAFile { .. } | SecretFileError::ReadableByOthers { .. }
            ),
            "{error}"
        );
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hbag_topsecret");
        assert_eq!(format!("{secret:?}"), "[REDACTED]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([REDACTED])");
    }

    #[test]
    fn private_dirs_are_created_and_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        assert_eq!(create_private_dir(&nested).unwrap(), None);
        assert_eq!(mode(&nested), 0o700);
        assert_eq!(mode(&dir.path().join("a")), 0o700);

        std::fs::set_permissions(&nested, Permissions::from_mode(0o755)).unwrap();
        let change = create_private_dir(&nested).unwrap().unwrap();
        assert_eq!((change.old_mode, change.new_mode), (0o755, 0o700));
        assert_eq!(mode(&nested), 0o700);
        assert_eq!(create_private_dir(&nested).unwrap(), None);
    }

    #[test]
    fn a_tree_is_made_private_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "x").unwrap();
        std::fs::set_permissions(&outside, Permissions::from_mode(0o644)).unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join("logs")).unwrap();
        std::fs::set_permissions(&root, Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("logs/1.log"), "log").unwrap();
        std::fs::set_permissions(root.join("logs/1.log"), Permissions::from_mode(0o664)).unwrap();
        std::fs::write(root.join("admin-token"), "t").unwrap();
        std::fs::set_permissions(root.join("admin-token"), Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();

        let changes = make_tree_private(&root).unwrap();
        let mut changed: Vec<_> = changes
            .iter()
            .map(|c| (c.path.strip_prefix(&root).unwrap().to_owned(), c.new_mode))
            .collect();
        changed.sort();
        let logs_mode = changed
            .iter()
            .find(|(path, _)| path == Path::new("logs"))
            .map(|(_, mode)| *mode);
        assert!(changed.contains(&(PathBuf::new(), 0o700)), "{changed:?}");
        assert!(
            changed.contains(&(PathBuf::from("logs/1.log"), 0o600)),
            "{changed:?}"
        );
        assert!(logs_mode.is_none_or(|mode| mode == 0o700), "{changed:?}");
        assert_eq!(mode(&root.join("admin-token")), 0o600);
        assert_eq!(mode(&outside), 0o644, "links are not followed");
        assert!(make_tree_private(&root).unwrap().is_empty());
    }

    #[test]
    fn private_files_are_0600_even_when_they_existed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.json");
        write_private_file(&path, b"{}").unwrap();
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write_private_file(&path, b"{\"a\":1}").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}");
        let appended = dir.path().join("1.log");
        private_open_options()
            .create(true)
            .append(true)
            .open(&appended)
            .unwrap();
        assert_eq!(mode(&appended), 0o600);
    }
}
