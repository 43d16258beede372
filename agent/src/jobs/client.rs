//! A connection process's side of the supervisor: a private `SOCK_SEQPACKET` pair whose other
//! end goes over the channel (`SCM_RIGHTS`, one record), then records both ways.

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags,
    SocketType,
};

use super::record::{self, Answer, Request};

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

/// Sends one request record.
pub fn send(sock: BorrowedFd<'_>, request: &Request<'_>, buf: &mut [u8]) -> Result<(), Errno> {
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

/// Receives the next record into `buf` without blocking.
pub fn receive<'a>(sock: BorrowedFd<'_>, buf: &'a mut [u8]) -> Received<'a> {
    let take = buf.len().min(record::MAX_RECORD);
    let Some(space) = buf.get_mut(..take) else {
        return Received::Gone;
    };
    match rustix::net::recv(sock, &mut *space, RecvFlags::DONTWAIT) {
        Ok((0, _)) => Received::Gone,
        Ok((n, _)) => match space.get(..n).and_then(record::answer) {
            Some(answer) => Received::Answer(answer),
            None => Received::Gone,
        },
        Err(Errno::AGAIN | Errno::INTR) => Received::Nothing,
        Err(_) => Received::Gone,
    }
}
