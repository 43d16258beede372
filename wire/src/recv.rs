//! The one receive buffer: bytes arrive in arbitrary pieces (a socket read, a 1-byte test read, an
//! embedder's own buffer) and leave as whole frames, cut in place without a copy.
//!
//! Total on every input: whatever is fed, in whatever pieces, into whatever buffer size, the answer
//! is a frame, "need more", or a typed [`RecvError`] — never a panic, never a stall without an
//! error. A buffer that cannot hold the frame announced at its front says so
//! ([`RecvError::FrameTooLarge`], or [`RecvError::BufferTooSmall`] below a header).

use core::fmt;

use crate::frame::FrameTooLarge;
use crate::limits::{HEADER_LEN, MAX_FRAME_BODY};

/// Why a [`RecvBuf`] cannot make progress. The stream is unusable from here on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// A length prefix announced a body larger than the limit (the protocol's or this buffer's).
    FrameTooLarge(FrameTooLarge),
    /// The buffer is smaller than a frame header: no frame can ever be read through it.
    BufferTooSmall,
    /// [`RecvBuf::spare`] was asked for room while a whole frame filled the buffer: take the
    /// frame first (a driver bug, reported rather than answered with an empty slice that a read
    /// would turn into a false end of stream).
    FrameWaiting,
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::FrameTooLarge(err) => err.fmt(f),
            RecvError::BufferTooSmall => f.write_str("receive buffer smaller than a frame header"),
            RecvError::FrameWaiting => f.write_str("receive buffer full with a frame not taken"),
        }
    }
}

impl From<FrameTooLarge> for RecvError {
    fn from(err: FrameTooLarge) -> Self {
        RecvError::FrameTooLarge(err)
    }
}

/// A receive buffer over caller-owned storage (`&mut [u8]`, `[u8; N]`, `Box<[u8]>`, …).
///
/// Two ways in: read straight into [`RecvBuf::spare`] and [`RecvBuf::commit`] what arrived
/// (zero-copy, for a socket), or [`RecvBuf::feed`] a slice (for bytes that are already somewhere).
/// Two ways out: [`RecvBuf::next_frame`] hands out whole frame bodies one by one, or
/// [`RecvBuf::data`] + [`RecvBuf::consume`] let a session cut frames off the front itself.
///
/// Sized [`crate::limits::MAX_FRAME`] it holds any frame of the protocol; a smaller one refuses larger frames
/// with [`RecvError::FrameTooLarge`] as soon as their header is in.
pub struct RecvBuf<B> {
    buf: B,
    start: usize,
    end: usize,
    /// Bytes of the frame [`RecvBuf::next_frame`] returned last, released on the next call.
    returned: usize,
}

impl<B> fmt::Debug for RecvBuf<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBuf")
            .field("start", &self.start)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> RecvBuf<B> {
    /// An empty buffer over `storage`.
    pub fn new(storage: B) -> Self {
        RecvBuf {
            buf: storage,
            start: 0,
            end: 0,
            returned: 0,
        }
    }

    /// The largest frame body this buffer can hold (at most [`MAX_FRAME_BODY`]).
    pub fn max_body(&self) -> usize {
        self.buf
            .as_ref()
            .len()
            .saturating_sub(HEADER_LEN)
            .min(MAX_FRAME_BODY)
    }

    /// The bytes received and not yet consumed. A frame [`RecvBuf::next_frame`] handed out is
    /// consumed already (it stays readable until the next call that takes `&mut self`), so a
    /// driver may mix both ways out without seeing a frame twice.
    pub fn data(&self) -> &[u8] {
        self.buf
            .as_ref()
            .get(self.start + self.returned..self.end)
            .unwrap_or(&[])
    }

    /// Whether no unconsumed bytes are buffered.
    pub fn is_empty(&self) -> bool {
        self.data().is_empty()
    }

    /// Drops `n` bytes from the front of [`RecvBuf::data`] (clamped to what is there).
    pub fn consume(&mut self, n: usize) {
        self.release();
        self.start += n.min(self.end - self.start);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Whether a whole frame is buffered (its header may also announce one too large: then
    /// [`RecvBuf::next_frame`] says so).
    pub fn has_frame(&self) -> bool {
        let data = self.data();
        match data.first_chunk::<HEADER_LEN>() {
            Some(header) => {
                let declared = u32::from_le_bytes(*header) as usize;
                declared > self.max_body() || data.len() - HEADER_LEN >= declared
            }
            None => false,
        }
    }

    /// Room to receive into. The buffered bytes are moved to the front when that makes room. An
    /// error when no room can be made: the frame at the front can never fit.
    pub fn spare(&mut self) -> Result<&mut [u8], RecvError> {
        self.spare_at_least(1)
    }

    /// Like [`RecvBuf::spare`], and also moves the buffered bytes to the front whenever fewer
    /// than `min` bytes of room are left behind them. A driver reading a socket into a buffer of
    /// several frames passes [`crate::limits::MAX_FRAME`], so no read is cut short by the end of
    /// the buffer (that would cost an extra small read on every pass through it).
    pub fn spare_at_least(&mut self, min: usize) -> Result<&mut [u8], RecvError> {
        self.release();
        let capacity = self.buf.as_ref().len();
        // Room for at least one byte is what every read needs, whatever `min` says.
        if self.start > 0 && capacity - self.end < min.max(1) {
            self.buf.as_mut().copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == capacity {
            if self.has_frame() {
                return Err(RecvError::FrameWaiting);
            }
            return Err(self.stuck());
        }
        let end = self.end;
        Ok(self.buf.as_mut().get_mut(end..).unwrap_or(&mut []))
    }

    /// Records that `n` bytes were received into [`RecvBuf::spare`] (clamped to its length).
    pub fn commit(&mut self, n: usize) {
        let capacity = self.buf.as_ref().len();
        self.end += n.min(capacity - self.end);
    }

    /// Copies as much of `input` as fits; returns how many bytes were taken. Taking 0 of a
    /// non-empty input means the buffer is full: cut a frame off first ([`RecvBuf::next_frame`]
    /// or [`RecvBuf::consume`]), or the error says why that cannot happen.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, RecvError> {
        let spare = self.spare()?;
        let n = spare.len().min(input.len());
        spare[..n].copy_from_slice(&input[..n]);
        self.commit(n);
        Ok(n)
    }

    /// The next whole frame's body, cut in place; it stays valid until the next call on this
    /// buffer. `Ok(None)`: more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, RecvError> {
        self.release();
        let max_body = self.max_body();
        let Some((_, used)) = crate::frame::split_frame(self.data(), max_body)? else {
            if self.buf.as_ref().len() < HEADER_LEN && self.end == self.buf.as_ref().len() {
                return Err(RecvError::BufferTooSmall);
            }
            return Ok(None);
        };
        self.returned = used;
        let body = self.start + HEADER_LEN..self.start + used;
        Ok(self.buf.as_ref().get(body))
    }

    /// Forgets everything buffered.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.returned = 0;
    }

    /// Gives the storage back.
    pub fn into_inner(self) -> B {
        self.buf
    }

    fn release(&mut self) {
        let returned = core::mem::take(&mut self.returned);
        if returned > 0 {
            self.start += returned.min(self.end - self.start);
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
        }
    }

    /// Why a full buffer holds no frame.
    fn stuck(&self) -> RecvError {
        match self.data().first_chunk::<HEADER_LEN>() {
            Some(header) => RecvError::FrameTooLarge(FrameTooLarge {
                declared: u32::from_le_bytes(*header),
            }),
            None => RecvError::BufferTooSmall,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{encode_client_frame, Bytes, ClientFrame, ClientHello};

    fn stream() -> Vec<u8> {
        let mut out = vec![0u8; 256];
        let mut stream = Vec::new();
        for frame in [
            ClientFrame::Hello(ClientHello::CURRENT),
            ClientFrame::Stdin(Bytes(b"abc")),
            ClientFrame::StdinEof,
            ClientFrame::Stdin(Bytes(&[7; 40])),
        ] {
            let n = encode_client_frame(&frame, &mut out).unwrap();
            stream.extend_from_slice(&out[..n]);
        }
        stream
    }

    /// Drives a buffer of `capacity` bytes over `input` in pieces of `piece` bytes, both through
    /// `feed` and through `spare`/`commit`; returns the frames, or the error it stopped at.
    /// Every round makes progress or ends: the buffer is total.
    fn drive(
        capacity: usize,
        input: &[u8],
        piece: usize,
        zero_copy: bool,
    ) -> Result<Vec<Vec<u8>>, RecvError> {
        let mut recv = RecvBuf::new(vec![0u8; capacity]);
        let mut frames = Vec::new();
        let mut rest = input;
        loop {
            while let Some(body) = recv.next_frame()? {
                frames.push(body.to_vec());
            }
            if rest.is_empty() {
                return Ok(frames);
            }
            let chunk = &rest[..piece.max(1).min(rest.len())];
            let taken = if zero_copy {
                let spare = recv.spare()?;
                let n = spare.len().min(chunk.len());
                spare[..n].copy_from_slice(&chunk[..n]);
                recv.commit(n);
                n
            } else {
                recv.feed(chunk)?
            };
            assert!(taken > 0, "no progress with capacity {capacity}");
            rest = &rest[taken..];
        }
    }

    #[test]
    fn reassembles_any_split_through_either_way_in() {
        let stream = stream();
        for piece in [1, 2, 3, 5, 7, 64, stream.len()] {
            for zero_copy in [false, true] {
                let frames = drive(48, &stream, piece, zero_copy).unwrap();
                assert_eq!(frames.len(), 4, "piece {piece}");
                assert_eq!(frames[1], [2, 3, b'a', b'b', b'c']);
            }
        }
    }

    #[test]
    fn refuses_a_frame_larger_than_the_buffer_at_its_header() {
        let mut recv = RecvBuf::new([0u8; 16]);
        assert_eq!(recv.feed(&[12, 0, 0, 0]), Ok(4));
        assert_eq!(recv.next_frame(), Ok(None));
        let mut recv = RecvBuf::new([0u8; 16]);
        assert_eq!(recv.feed(&[13, 0, 0, 0, 1, 2]), Ok(6));
        let too_large = Err(RecvError::FrameTooLarge(FrameTooLarge { declared: 13 }));
        assert_eq!(recv.next_frame(), too_large);
        assert!(
            recv.has_frame(),
            "an oversized header is reported, not waited on"
        );
    }

    #[test]
    fn below_a_header_it_says_so() {
        for capacity in 0..HEADER_LEN {
            let err = drive(capacity, &stream(), 1, true).unwrap_err();
            assert_eq!(err, RecvError::BufferTooSmall, "capacity {capacity}");
            let err = drive(capacity, &stream(), 1, false).unwrap_err();
            assert_eq!(err, RecvError::BufferTooSmall, "capacity {capacity}");
        }
    }

    #[test]
    fn a_full_buffer_with_a_frame_in_it_is_not_an_end_of_stream() {
        let mut recv = RecvBuf::new([0u8; 7]);
        assert_eq!(recv.feed(&[3, 0, 0, 0, 1, 2, 3]), Ok(7));
        assert_eq!(recv.spare().map(|s| s.len()), Err(RecvError::FrameWaiting));
        assert_eq!(recv.next_frame(), Ok(Some(&[1u8, 2, 3][..])));
        assert_eq!(recv.spare().map(|s| s.len()), Ok(7));
    }

    /// Found by the `recv_buf` fuzz target: `data` still showed the frame `next_frame` had
    /// handed out, so a driver cutting the next frame off `data` got that one a second time.
    #[test]
    fn a_frame_handed_out_is_not_in_data() {
        let mut recv = RecvBuf::new([0u8; 32]);
        assert_eq!(recv.feed(&[1, 0, 0, 0, 7, 1, 0, 0, 0, 8]), Ok(10));
        assert_eq!(recv.next_frame(), Ok(Some(&[7u8][..])));
        assert_eq!(recv.data(), [1, 0, 0, 0, 8]);
        assert!(recv.has_frame());
        recv.consume(5);
        assert!(recv.is_empty());
        assert_eq!(recv.next_frame(), Ok(None));
        assert_eq!(recv.feed(&[1, 0, 0, 0, 9]), Ok(5));
        assert_eq!(recv.next_frame(), Ok(Some(&[9u8][..])));
        assert!(
            recv.is_empty(),
            "the last frame handed out leaves nothing behind"
        );
    }

    /// Found by the `recv_buf` fuzz target: `spare_at_least(0)` on a buffer full to its end
    /// with room at its front reported a stuck buffer instead of moving the bytes forward.
    #[test]
    fn spare_at_least_zero_still_makes_room() {
        let mut recv = RecvBuf::new([0u8; 6]);
        assert_eq!(recv.feed(&[0, 0, 0, 0, 3, 0]), Ok(6));
        assert_eq!(recv.next_frame(), Ok(Some(&[][..])));
        assert_eq!(recv.spare_at_least(0).map(|s| s.len()), Ok(4));
        assert_eq!(recv.data(), [3, 0]);
    }

    #[test]
    fn consume_and_commit_clamp() {
        let mut recv = RecvBuf::new([0u8; 8]);
        recv.commit(100);
        assert_eq!(recv.data().len(), 8);
        recv.consume(100);
        assert!(recv.is_empty());
    }

    #[test]
    fn spare_at_least_moves_a_partial_frame_forward_only_when_room_is_short() {
        let mut recv = RecvBuf::new([0u8; 16]);
        assert_eq!(recv.feed(&[2, 0, 0, 0, 1, 2, 9, 0]), Ok(8));
        assert_eq!(recv.next_frame(), Ok(Some(&[1u8, 2][..])));
        assert_eq!(recv.spare_at_least(8).map(|s| s.len()), Ok(8));
        assert_eq!(recv.spare_at_least(12).map(|s| s.len()), Ok(14));
        assert_eq!(recv.data(), [9, 0]);
    }

    proptest! {
        /// Any bytes, any buffer size (tiny ones included), any read size: frames or a typed
        /// error, never a panic or a stall.
        #[test]
        fn total_on_every_input(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            capacity in 0usize..80,
            piece in 1usize..9,
            zero_copy in any::<bool>(),
        ) {
            let _ = drive(capacity, &bytes, piece, zero_copy);
        }

        /// A valid stream comes out whole in 1-byte reads whenever the buffer holds its largest
        /// frame.
        #[test]
        fn valid_streams_survive_one_byte_reads(capacity in 48usize..100, zero_copy in any::<bool>()) {
            let frames = drive(capacity, &stream(), 1, zero_copy).unwrap();
            prop_assert_eq!(frames.len(), 4);
        }
    }
}
