//! Reading a whole (small) file into a caller's buffer: the policy, /etc/passwd and /etc/group,
//! the kernel command line, cgroup and /proc files, the secret. One loop, total on any size.

use core::ffi::CStr;

use rustix::fd::BorrowedFd;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

/// What [`read_fd`] read.
#[derive(Debug)]
pub struct FileText<'b> {
    pub text: &'b [u8],
    /// The file is longer than the buffer (the rest was not read).
    pub truncated: bool,
}

/// Reads from `fd` until its end or until `buf` is full.
pub fn read_fd<'b>(fd: BorrowedFd<'_>, buf: &'b mut [u8]) -> Result<FileText<'b>, Errno> {
    let mut len = 0;
    let mut truncated = false;
    loop {
        let Some(rest @ [_, ..]) = buf.get_mut(len..) else {
            // Full: is there more?
            let mut probe = [0u8; 1];
            truncated = matches!(rustix::io::read(fd, &mut probe), Ok(1..));
            break;
        };
        let room = rest.len();
        match rustix::io::read(fd, rest) {
            Ok(0) => break,
            Ok(n) => len += n.min(room),
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
    let buf: &'b [u8] = buf;
    Ok(FileText {
        text: buf.get(..len).unwrap_or(&[]),
        truncated,
    })
}

/// Opens `path` (relative to `dir`) and reads it as [`read_fd`] does.
pub fn read_at<'b>(
    dir: BorrowedFd<'_>,
    path: &CStr,
    buf: &'b mut [u8],
) -> Result<FileText<'b>, Errno> {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = rustix::fs::openat(dir, path, flags, Mode::empty())?;
    read_fd(rustix::fd::AsFd::as_fd(&fd), buf)
}

/// Opens `path` and reads it as [`read_fd`] does.
pub fn read<'b>(path: &CStr, buf: &'b mut [u8]) -> Result<FileText<'b>, Errno> {
    read_at(rustix::fs::CWD, path, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_cut_and_missing_files() {
        let path = std::env::temp_dir().join(format!("ferry-file-{}", std::process::id()));
        std::fs::write(&path, b"0123456789").unwrap();
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        let mut buf = [0u8; 10];
        let whole = read(&c_path, &mut buf).unwrap();
        assert_eq!((whole.text, whole.truncated), (&b"0123456789"[..], false));
        let mut small = [0u8; 4];
        let cut = read_at(rustix::fs::CWD, &c_path, &mut small).unwrap();
        assert_eq!((cut.text, cut.truncated), (&b"0123"[..], true));
        let mut empty = [0u8; 0];
        assert!(read(&c_path, &mut empty).unwrap().truncated);
        assert_eq!(read(c"/no/such/file", &mut buf).err(), Some(Errno::NOENT));
        std::fs::remove_file(&path).unwrap();
    }
}
