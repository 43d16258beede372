//! ferry's wire protocol: the frames a host and the guest agent exchange over one stream.
//!
//! Sans-IO by construction: this crate never touches a socket, never allocates and never reads a
//! clock, so a VMM can drive it from its own event loop. A frame is a little-endian `u32` body
//! length followed by a postcard body ([`ClientFrame`] or [`AgentFrame`]). Every connection opens
//! with [`ClientFrame::Hello`] → [`AgentFrame::Hello`]; then one operation runs. Every bound is a
//! named constant in [`limits`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

mod bytes;
mod frame;
pub mod limits;
mod msg;
mod recv;
pub mod session;

pub use bytes::Bytes;
pub use frame::{
    decode_agent_frame, decode_client_frame, encode_agent_frame, encode_client_frame,
    frame_data_in_place, split_frame, DataKind, DecodeError, EncodeError, FrameTooLarge,
    DATA_HEADROOM,
};
pub use msg::{
    AgentFrame, AgentHello, ClientFrame, ClientHello, ErrorCode, ErrorFrame, ExecRequest,
    ExitStatus, Limits, ReadyReport, RequestError, Started, StdinMode, StrList, Termination,
    ValidExec, MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use recv::{RecvBuf, RecvError};

#[cfg(test)]
mod tests;
