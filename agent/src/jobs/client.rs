//! A connection process's side of the supervisor: a private `SOCK_SEQPACKET` pair whose other
//! end goes over the channel (`SCM_RIGHTS`, one record), then records both ways.

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags,
    SocketType,
};

use super::record::{self, Answer};

/// Opens a private line to the supervisor over `channel`; `Err` when there is none (no
/// supervisor, or a dead one: its channel's end is closed).
pub fn open(channel: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let fds = [theirs.as_fd()];
    let mut space = [core::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(Errno::NOBUFS);
    }
    let iov = [rustix::io::IoSlice::new(&[0])];
    // Never blocks for long: the supervisor drains its channel every turn. A dead
    // supervisor's channel refuses at once (EPIPE / ECONNREFUSED).
    rustix::net::sendmsg(channel, &iov, &mut control, SendFlags::NOSIGNAL)?;
    Ok(ours)
}

/// Sends one request record (the supervisor's tests; a connection process sends its records
/// from its own buffers).
#[cfg(test)]
pub fn send(
    sock: BorrowedFd<'_>,
    request: &record::Request<'_>,
    buf: &mut [u8],
) -> Result<(), Errno> {
    let n = request.encode(buf).ok_or(Errno::MSGSIZE)?;
    rustix::net::send(sock, buf.get(..n).unwrap_or(&[]), SendFlags::NOSIGNAL)?;
    Ok(())
}

/// What the supervisor said next, without blocking.
pub enum Received<'a> {
    Answer(Answer<'a>),
    /// Nothing yet.
    Nothing,
    /// The supervisor is gone, or said something that is not a record.
    Gone,
}

/// Receives the next record into `buf` without blocking: its length, `Ok(None)` when nothing
/// came yet, `Err` when the supervisor is gone.
pub fn receive_raw(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Option<usize>, ()> {
    let take = buf.len().min(record::MAX_RECORD);
    let space = buf.get_mut(..take).ok_or(())?;
    let mut received = rustix::net::recv(sock, &mut *space, RecvFlags::DONTWAIT);
    if received == Err(Errno::CONNRESET) {
        // NOTE: said once when the supervisor closed its end with a record of ours unread (a
        // line refused `Busy` before its request was read); what it sent first is still here.
        received = rustix::net::recv(sock, &mut *space, RecvFlags::DONTWAIT);
    }
    match received {
        Ok((0, _)) => Err(()),
        Ok((n, _)) => Ok(Some(n.min(take))),
        Err(Errno::AGAIN | Errno::INTR) => Ok(None),
        Err(_) => Err(()),
    }
}

/// Receives the next record into `buf` without blocking.
pub fn receive<'a>(sock: BorrowedFd<'_>, buf: &'a mut [u8]) -> Received<'a> {
    match receive_raw(sock, buf) {
        Ok(Some(n)) => match buf.get(..n).and_then(record::answer) {
            Some(answer) => Received::Answer(answer),
            None => Received::Gone,
        },
        Ok(None) => Received::Nothing,
        Err(()) => Received::Gone,
    }
}

/// Sends one record made of `head` and `data` (an exec frame, stdin bytes) without copying
/// them together.
pub fn send_parts(sock: BorrowedFd<'_>, head: &[u8], data: &[u8]) -> Result<(), Errno> {
    let iov = [
        rustix::io::IoSlice::new(head),
        rustix::io::IoSlice::new(data),
    ];
    let mut control = SendAncillaryBuffer::default();
    rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// Waits until `deadline` (monotonic µs) for the next record (or the end); whether one may
/// be there.
pub fn readable_by(sock: BorrowedFd<'_>, deadline: u64) -> bool {
    use rustix::event::{PollFd, PollFlags};
    loop {
        let mut fds = [PollFd::from_borrowed_fd(sock, PollFlags::IN)];
        let timeout = crate::clock::timeout_until(deadline);
        let _ = rustix::event::poll(&mut fds, Some(&timeout));
        if !fds[0].revents().is_empty() {
            return true;
        }
        if crate::clock::monotonic_us() >= deadline {
            return false;
        }
    }
}
