//! Who may talk to the agent: the per-VM secret, read once at start, and each connection's
//! fresh nonce. The protocol step itself (proofs, constant-time check) is `ferry_wire`'s.

use core::ffi::CStr;

use ferry_wire::limits::{MAX_SECRET, MIN_SECRET, NONCE_LEN};
use ferry_wire::session::{AgentConfig, Secret};
use ferry_wire::Security;
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

/// What every connection process is served with: the protocol configuration announced in its
/// hello and the secret (`None`: the agent runs `--insecure`).
pub struct Serving {
    pub config: AgentConfig,
    pub secret: Option<Secret>,
}

impl Serving {
    /// What the hello says about authentication.
    pub fn security(&self) -> Security {
        if self.secret.is_some() {
            Security::Authenticated
        } else {
            Security::Insecure
        }
    }
}

/// Why the secret file cannot be used: the agent does not start with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretFileError {
    /// It cannot be opened or read (see the errno).
    Unreadable(Errno),
    /// It is not a regular file.
    NotAFile,
    /// Group or others may read or write it.
    Exposed,
    /// Fewer than 16 bytes (an empty file included).
    TooShort,
    /// More than 4096 bytes.
    TooLong,
}

impl SecretFileError {
    /// The message for the console.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            SecretFileError::Unreadable(_) => b"secret file: cannot read it",
            SecretFileError::NotAFile => b"secret file: not a regular file",
            SecretFileError::Exposed => {
                b"secret file: group or others may read or write it (chmod 600 or 400)"
            }
            SecretFileError::TooShort => b"secret file: shorter than 16 bytes",
            SecretFileError::TooLong => b"secret file: longer than 4096 bytes",
        }
    }
}

/// Reads and keys the secret file: a regular file of 16 to 4096 bytes that only its owner may
/// read. The whole content is the secret (a trailing newline included; the host reads the same
/// bytes). The bytes are wiped from the stack once keyed.
pub fn load_secret(path: &CStr) -> Result<Secret, SecretFileError> {
    let file = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(SecretFileError::Unreadable)?;
    let stat = rustix::fs::fstat(&file).map_err(SecretFileError::Unreadable)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(SecretFileError::NotAFile);
    }
    if stat.st_mode & 0o077 != 0 {
        return Err(SecretFileError::Exposed);
    }
    let mut bytes = [0u8; MAX_SECRET + 1];
    let read = crate::file::read_fd(rustix::fd::AsFd::as_fd(&file), &mut bytes)
        .map(|read| read.text.len())
        .map_err(SecretFileError::Unreadable);
    let result = match read {
        Err(err) => Err(err),
        Ok(0..MIN_SECRET) => Err(SecretFileError::TooShort),
        Ok(len @ MIN_SECRET..=MAX_SECRET) => {
            Secret::new(bytes.get(..len).unwrap_or(&[])).map_err(|_| SecretFileError::TooLong)
        }
        Ok(_) => Err(SecretFileError::TooLong),
    };
    bytes.fill(0);
    // Keep the wipe: the buffer is otherwise dead and the compiler may drop the stores.
    core::hint::black_box(&bytes);
    result
}

/// A fresh nonce for one connection, from the kernel's CSPRNG (`getrandom`, which waits only
/// until the pool is first initialised, early in boot).
pub fn nonce() -> Result<[u8; NONCE_LEN], Errno> {
    let mut nonce = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < NONCE_LEN {
        let rest = nonce.get_mut(filled..).unwrap_or(&mut []);
        match rustix::rand::getrandom(rest, rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
    Ok(nonce)
}

/// Who is on the other end of `sock`, for the log: `vsock CID:PORT` or `a unix client`.
pub fn peer_label(sock: rustix::fd::BorrowedFd<'_>) -> heapless::Vec<u8, 40> {
    let mut label = heapless::Vec::new();
    let peer = rustix::net::getpeername(sock).ok().flatten();
    match peer.as_ref().and_then(crate::sys::VsockAddr::from_any) {
        Some(vsock) => {
            let _ = label.extend_from_slice(b"vsock ");
            push_decimal(&mut label, vsock.cid());
            let _ = label.push(b':');
            push_decimal(&mut label, vsock.port());
        }
        None => {
            let _ = label.extend_from_slice(b"a unix client");
        }
    }
    label
}

fn push_decimal<const N: usize>(out: &mut heapless::Vec<u8, N>, value: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut value = value;
    loop {
        at -= 1;
        if let Some(digit) = digits.get_mut(at) {
            *digit = b'0' + (value % 10) as u8;
        }
        value /= 10;
        if value == 0 || at == 0 {
            break;
        }
    }
    let _ = out.extend_from_slice(digits.get(at..).unwrap_or(&[]));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(name: &str, bytes: &[u8], mode: u32) -> std::ffi::CString {
        let dir = std::env::temp_dir().join(format!("ferry-agent-auth-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        std::ffi::CString::new(path.into_os_string().into_encoded_bytes()).unwrap()
    }

    #[test]
    fn secret_files_at_their_edges() {
        assert!(load_secret(&file("ok16", &[1; 16], 0o600)).is_ok());
        assert!(load_secret(&file("ok4096", &[1; 4096], 0o400)).is_ok());
        let err = |name, bytes: &[u8], mode| load_secret(&file(name, bytes, mode)).err();
        assert_eq!(
            err("short", &[1; 15], 0o600),
            Some(SecretFileError::TooShort)
        );
        assert_eq!(err("empty", &[], 0o600), Some(SecretFileError::TooShort));
        assert_eq!(
            err("long", &[1; 4097], 0o600),
            Some(SecretFileError::TooLong)
        );
        assert_eq!(
            err("huge", &[1; 100_000], 0o600),
            Some(SecretFileError::TooLong)
        );
        assert_eq!(err("g", &[1; 32], 0o640), Some(SecretFileError::Exposed));
        assert_eq!(err("o", &[1; 32], 0o604), Some(SecretFileError::Exposed));
        assert_eq!(err("w", &[1; 32], 0o620), Some(SecretFileError::Exposed));
        assert!(matches!(
            load_secret(c"/nonexistent/ferry-secret"),
            Err(SecretFileError::Unreadable(_))
        ));
        assert_eq!(load_secret(c"/tmp").err(), Some(SecretFileError::NotAFile));
    }

    #[test]
    fn nonces_are_fresh() {
        let (a, b) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(a, b);
        assert_ne!(a, [0; NONCE_LEN]);
    }
}
