//! The per-VM secret, read from a file the way the agent reads its copy: the whole content,
//! exactly, from a regular file nobody but its owner may read.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use ferry_wire::limits::{MAX_SECRET, MIN_SECRET};
pub use ferry_wire::session::Secret;

use crate::error::Error;

/// The environment variable the CLI (and [`secret_from_env`]) reads the secret file's path from.
pub const SECRET_FILE_ENV: &str = "FERRY_SECRET_FILE";

/// Reads a secret file: a regular file of 16 to 4096 bytes, not readable or writable by group
/// or others (like an ssh private key). Its whole content is the secret, a trailing newline
/// included: both ends read the same bytes.
pub fn read_secret_file(path: impl AsRef<Path>) -> Result<Secret, Error> {
    let path = path.as_ref();
    let fail = |reason: String| Error::Secret {
        path: path.to_owned(),
        reason,
    };
    let mut file = File::open(path).map_err(|err| fail(err.to_string()))?;
    let meta = file.metadata().map_err(|err| fail(err.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(fail("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "mode {mode:04o} lets group or others read or write it: chmod 600 it"
        )));
    }
    let _ = meta.uid();
    let mut bytes = Vec::with_capacity(MAX_SECRET + 1);
    file.by_ref()
        .take(MAX_SECRET as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| fail(err.to_string()))?;
    if bytes.len() < MIN_SECRET {
        return Err(fail(format!(
            "{} bytes: a secret has at least {MIN_SECRET}",
            bytes.len()
        )));
    }
    let secret = Secret::new(&bytes).map_err(|err| fail(err.as_str().into()));
    // The bytes are not needed once keyed.
    bytes.fill(0);
    secret
}

/// The secret named by `FERRY_SECRET_FILE`, if that is set (and not empty).
pub fn secret_from_env() -> Result<Option<Secret>, Error> {
    match std::env::var_os(SECRET_FILE_ENV) {
        Some(path) if !path.is_empty() => read_secret_file(path).map(Some),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn secret_files_at_their_edges() {
        let dir = std::env::temp_dir().join(format!("ferry-secret-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        assert!(read_secret_file(write(&dir, "ok", &[1; 16], 0o600)).is_ok());
        assert!(read_secret_file(write(&dir, "ro", &[1; 4096], 0o400)).is_ok());
        let short = read_secret_file(write(&dir, "short", &[1; 15], 0o600)).unwrap_err();
        assert!(short.to_string().contains("at least 16"), "{short}");
        let long = read_secret_file(write(&dir, "long", &[1; 4097], 0o600)).unwrap_err();
        assert!(long.to_string().contains("longer than 4096"), "{long}");
        let empty = read_secret_file(write(&dir, "empty", b"", 0o600)).unwrap_err();
        assert!(empty.to_string().contains("0 bytes"), "{empty}");
        for mode in [0o640, 0o604, 0o660, 0o620] {
            let err = read_secret_file(write(&dir, &format!("m{mode:o}"), &[1; 32], mode));
            assert!(err.unwrap_err().to_string().contains("chmod 600"));
        }
        assert!(read_secret_file(dir.join("missing")).is_err());
        assert!(read_secret_file(&dir)
            .unwrap_err()
            .to_string()
            .contains("regular"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
