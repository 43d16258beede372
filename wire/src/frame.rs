//! Framing: a little-endian `u32` body length, then a postcard body. Encoding writes into the
//! caller's buffer; decoding borrows from it. No I/O, no allocation, no clock.

use core::fmt;

use serde::Serialize;

use crate::encode::Writer;
use crate::limits::{DATA_OVERHEAD, HEADER_LEN, MAX_DATA, MAX_FRAME_BODY};
use crate::msg::{AgentFrame, ClientFrame};

/// Why a frame could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer is too small for the frame.
    BufferTooSmall,
    /// The frame's body would exceed [`MAX_FRAME_BODY`]; the peer would refuse it.
    TooLarge,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EncodeError::BufferTooSmall => "output buffer too small for frame",
            EncodeError::TooLarge => "frame exceeds the protocol's size limit",
        })
    }
}

/// Why a frame body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The body is not a valid encoding of any frame of this protocol version.
    Malformed,
    /// The body decoded but bytes were left over.
    TrailingBytes,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecodeError::Malformed => "malformed frame body",
            DecodeError::TrailingBytes => "trailing bytes after frame body",
        })
    }
}

/// A frame's length prefix announced more than the limit. The stream cannot be trusted after
/// this: close the connection (after an error frame, if you are the agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLarge {
    /// The length the prefix announced.
    pub declared: u32,
}

impl fmt::Display for FrameTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "frame of {} bytes exceeds the limit", self.declared)
    }
}

/// Encodes a client frame (header and body) into `out`; returns the bytes written.
pub fn encode_client_frame(frame: &ClientFrame<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    encode(frame, out)
}

/// Encodes an agent frame (header and body) into `out`; returns the bytes written.
pub fn encode_agent_frame(frame: &AgentFrame<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    // By hand, exactly as postcard would (see `encode.rs`): smaller in the agent.
    let body_space = out
        .get_mut(HEADER_LEN..)
        .ok_or(EncodeError::BufferTooSmall)?;
    let body_len = crate::encode::agent_frame(frame, body_space).ok_or(full(body_space))?;
    finish(out, body_len)
}

fn encode<T: Serialize>(frame: &T, out: &mut [u8]) -> Result<usize, EncodeError> {
    let body_space = out
        .get_mut(HEADER_LEN..)
        .ok_or(EncodeError::BufferTooSmall)?;
    let body_len = match postcard::to_slice(frame, body_space) {
        Ok(body) => body.len(),
        Err(postcard::Error::SerializeBufferFull) => return Err(full(body_space)),
        Err(_) => return Err(EncodeError::TooLarge),
    };
    finish(out, body_len)
}

/// Why a body did not fit `body_space`: the buffer, or (when it could hold the largest body)
/// the frame.
fn full(body_space: &[u8]) -> EncodeError {
    if body_space.len() >= MAX_FRAME_BODY {
        EncodeError::TooLarge
    } else {
        EncodeError::BufferTooSmall
    }
}

/// Writes the length prefix of the `body_len` bytes after it.
fn finish(out: &mut [u8], body_len: usize) -> Result<usize, EncodeError> {
    if body_len > MAX_FRAME_BODY {
        return Err(EncodeError::TooLarge);
    }
    out[..HEADER_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(HEADER_LEN + body_len)
}

/// Decodes a client frame body (without its length prefix).
pub fn decode_client_frame(body: &[u8]) -> Result<ClientFrame<'_>, DecodeError> {
    // By hand, exactly as postcard would (see `decode.rs`): smaller in the agent.
    match crate::decode::client_frame(body) {
        Some((frame, 0)) => Ok(frame),
        Some(_) => Err(DecodeError::TrailingBytes),
        None => Err(DecodeError::Malformed),
    }
}

/// Decodes an agent frame body (without its length prefix).
pub fn decode_agent_frame(body: &[u8]) -> Result<AgentFrame<'_>, DecodeError> {
    decode(body)
}

fn decode<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    match postcard::take_from_bytes(body) {
        Ok((frame, [])) => Ok(frame),
        Ok(_) => Err(DecodeError::TrailingBytes),
        Err(_) => Err(DecodeError::Malformed),
    }
}

/// The data-carrying frames, for building them in place around a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// [`ClientFrame::Stdin`].
    Stdin,
    /// [`AgentFrame::Stdout`].
    Stdout,
    /// [`AgentFrame::Stderr`].
    Stderr,
    /// [`AgentFrame::FileData`].
    FileData,
}

impl DataKind {
    /// The frame's variant tag: its postcard enum index, pinned by the golden tests.
    const fn tag(self) -> u8 {
        match self {
            DataKind::Stdin => 2,
            DataKind::Stdout => 2,
            DataKind::Stderr => 3,
            DataKind::FileData => 13,
        }
    }
}

/// Where a payload must start in a buffer for [`frame_data_in_place`]: room for the length
/// prefix, the tag, an output chunk's timestamp and the length varint.
pub const DATA_HEADROOM: usize = HEADER_LEN + DATA_OVERHEAD;

/// Frames a payload without copying it. The payload sits at `buf[DATA_HEADROOM..][..len]`; the
/// header is written just before it and the frame's start offset is returned: send
/// `buf[start..DATA_HEADROOM + len]`. Output chunks carry `at_us` ([`crate::Output::at_us`]);
/// stdin and file data ignore it. The bytes are exactly those [`encode_agent_frame`] (or
/// [`encode_client_frame`] for stdin) would produce.
pub fn frame_data_in_place(
    buf: &mut [u8],
    kind: DataKind,
    len: usize,
    at_us: u64,
) -> Result<usize, EncodeError> {
    if len > MAX_DATA {
        return Err(EncodeError::TooLarge);
    }
    if buf.len() < DATA_HEADROOM + len {
        return Err(EncodeError::BufferTooSmall);
    }
    // Tag, then (output only) the timestamp, then the length: written as `encode.rs` writes
    // them, into one buffer, in order.
    let mut prefix = [0u8; DATA_OVERHEAD];
    let mut w = Writer::new(&mut prefix);
    w.byte(kind.tag());
    if matches!(kind, DataKind::Stdout | DataKind::Stderr) {
        w.varint(at_us);
    }
    w.varint(len as u64);
    // DATA_OVERHEAD holds the tag and two varints of any value.
    let at = w.written().ok_or(EncodeError::TooLarge)?;
    let body_len = at + len;
    let start = DATA_HEADROOM - (HEADER_LEN + at);
    buf[start..start + HEADER_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
    buf[start + HEADER_LEN..DATA_HEADROOM].copy_from_slice(&prefix[..at]);
    Ok(start)
}

/// Cuts one frame off the front of `buf` without copying: `Ok(Some((body, consumed)))` when a
/// whole frame is there, `Ok(None)` when more bytes are needed, and an error as soon as the
/// length prefix exceeds `max_body` (at most [`MAX_FRAME_BODY`]).
pub fn split_frame(buf: &[u8], max_body: usize) -> Result<Option<(&[u8], usize)>, FrameTooLarge> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let declared = u32::from_le_bytes(*header);
    if declared as usize > max_body.min(MAX_FRAME_BODY) {
        return Err(FrameTooLarge { declared });
    }
    let total = HEADER_LEN + declared as usize;
    Ok(buf.get(HEADER_LEN..total).map(|body| (body, total)))
}
