//! Pseudo-terminals for `exec -t` (issue 10): a master the connection process keeps (its
//! stdin sink and its output source: the command's stdout and stderr arrive merged, as over
//! `ssh -t`), and a slave that becomes the command's controlling terminal and its 0, 1 and 2
//! (see `spawn::exec_child`).
//!
//! Reading the master once every slave descriptor is closed gives `EIO`: that is its EOF (the
//! kernel hands out what was written before the last close first).

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;

use crate::{cstr, sys};
use ferry_wire::WindowSize as Size;

/// A pseudo-terminal pair.
pub struct Pty {
    /// Non-blocking, like the pipes' parent ends.
    pub master: OwnedFd,
    /// For the command; the parent closes its copy once the child has it, or the master never
    /// sees its EOF.
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `size`. Every descriptor is close-on-exec and none becomes our
/// controlling terminal.
pub fn open(size: Size) -> Result<Pty, Errno> {
    let flags = OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let master = rustix::fs::open(c"/dev/ptmx", flags, Mode::empty())?;
    rustix::pty::unlockpt(&master)?;
    let peer = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let slave = match rustix::pty::ioctl_tiocgptpeer(&master, peer) {
        Ok(slave) => slave,
        // Before Linux 4.13: by its number, from the devpts at /dev/pts.
        Err(_) => open_by_number(&master)?,
    };
    resize(&master, size)?;
    Ok(Pty { master, slave })
}

/// `/dev/pts/N` for `master`, opened like `TIOCGPTPEER` would.
fn open_by_number(master: &OwnedFd) -> Result<OwnedFd, Errno> {
    let number = sys::pty_number(master)?;
    let mut digits = [0u8; 20];
    let digits = crate::cgroup::decimal(&mut digits, u64::from(number));
    let mut path = [0u8; 32];
    let path = cstr::join(&mut path, &[b"/dev/pts/", digits]).ok_or(Errno::NAMETOOLONG)?;
    let flags = OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC;
    rustix::fs::open(path, flags, Mode::empty())
}

/// Sets the terminal's size (`TIOCSWINSZ` on the master): the kernel sends SIGWINCH to the
/// terminal's foreground process group when it changed.
pub fn resize(master: impl AsFd, size: Size) -> Result<(), Errno> {
    let winsize = Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(master, winsize)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Reads the master until its EOF (`EIO` once the slave is closed), waiting while empty.
    pub fn read_all(master: &OwnedFd) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match rustix::io::read(master, &mut buf) {
                Ok(0) | Err(Errno::IO) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(Errno::AGAIN | Errno::INTR) => {
                    let mut fds = [rustix::event::PollFd::new(
                        master,
                        rustix::event::PollFlags::IN,
                    )];
                    let _ = rustix::event::poll(&mut fds, None);
                }
                Err(errno) => panic!("read: {errno:?}"),
            }
        }
    }

    #[test]
    fn a_pair_carries_bytes_both_ways_and_ends_in_eio() {
        let pty = open(Size { rows: 24, cols: 80 }).unwrap();
        let size = rustix::termios::tcgetwinsize(&pty.slave).unwrap();
        assert_eq!((size.ws_row, size.ws_col), (24, 80));
        resize(
            &pty.master,
            Size {
                rows: 50,
                cols: 132,
            },
        )
        .unwrap();
        let size = rustix::termios::tcgetwinsize(&pty.slave).unwrap();
        assert_eq!((size.ws_row, size.ws_col), (50, 132));
        // The line discipline turns "\n" into "\r\n" on the way out, as a terminal expects.
        rustix::io::write(&pty.slave, b"out\n").unwrap();
        rustix::io::write(&pty.master, b"in\n").unwrap();
        let mut buf = [0u8; 16];
        let n = rustix::io::read(&pty.slave, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"in\n");
        drop(pty.slave);
        // What was written before the last close comes first, then EIO; the terminal echoed
        // the input, as an interactive one does.
        assert_eq!(read_all(&pty.master), b"out\r\nin\r\n");
    }

    #[test]
    fn the_slave_can_be_found_by_its_number() {
        let pty = open(Size { rows: 1, cols: 1 }).unwrap();
        let by_number = open_by_number(&pty.master).unwrap();
        let a = rustix::fs::fstat(&pty.slave).unwrap();
        let b = rustix::fs::fstat(&by_number).unwrap();
        assert_eq!(a.st_rdev, b.st_rdev, "the same terminal");
        // The master is no terminal of ours and reads without blocking.
        assert_eq!(
            rustix::io::read(&pty.master, &mut [0u8; 4]),
            Err(Errno::AGAIN)
        );
    }
}
