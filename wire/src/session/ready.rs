//! The readiness announcement: the one conversation the agent opens. Once listening, the agent
//! connects to the host port named by `ferry.ready=` and sends its hello and a [`ReadyReport`],
//! then closes. Both ends of it live here.

use crate::frame::{decode_agent_frame, encode_agent_frame, split_frame};
use crate::limits::MAX_FRAME_BODY;
use crate::msg::{
    AgentFrame, ReadyReport, Security, MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use super::AgentConfig;

use super::{AgentInfo, FrameKind, Input, Phase, SessionError};

/// The announcement an agent sends: its hello, then the report. Returns the bytes written.
///
/// NOTE: the announcement is not authenticated (the agent proves nothing and has no nonce to
/// give); it carries boot timings only, and the host learns nothing from it that it relies on
/// for security. Its `security` says what the agent's connections require.
pub fn encode_ready_announcement(
    config: &AgentConfig,
    security: Security,
    report: ReadyReport,
    out: &mut [u8],
) -> Result<usize, SessionError> {
    let hello = AgentFrame::Hello(super::agent::agent_hello(
        config.agent_version,
        config.limits,
        config.bounds,
        [0; crate::limits::NONCE_LEN],
        security,
    ));
    let n = encode_agent_frame(&hello, out)?;
    let rest = out.get_mut(n..).unwrap_or(&mut []);
    Ok(n + encode_agent_frame(&AgentFrame::Ready(report), rest)?)
}

/// What the host learns from an announcement, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyEvent<'a> {
    /// The agent's hello: it is a ferry agent of a version this crate speaks.
    Hello(AgentInfo<'a>),
    /// The report: the guest's CID and the agent's boot timings. The last event.
    Ready(ReadyReport<'a>),
}

/// The host's end of the announcement: checks the hello (magic, version), then takes the report;
/// anything else, or anything after it, is a typed error.
#[derive(Debug, Clone, Default)]
pub struct ReadyReceiver {
    hello_seen: bool,
    done: bool,
}

impl ReadyReceiver {
    /// A receiver awaiting the agent's hello.
    pub fn new() -> ReadyReceiver {
        ReadyReceiver::default()
    }

    /// Whether the report has arrived.
    pub fn is_finished(&self) -> bool {
        self.done
    }

    /// Parses at most one frame from the front of `input`, like the other sessions.
    pub fn handle_input<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Input<ReadyEvent<'a>>, SessionError> {
        let Some((body, consumed)) = split_frame(input, MAX_FRAME_BODY)? else {
            return Ok(Input::NEED_MORE);
        };
        let frame = decode_agent_frame(body).map_err(|_| SessionError::Malformed)?;
        let phase = self.phase();
        let event = match frame {
            AgentFrame::Hello(hello) if !self.hello_seen && !self.done => {
                if hello.magic != MAGIC {
                    return Err(SessionError::NotFerry);
                }
                let version = hello.version.min(PROTOCOL_VERSION);
                if hello.min_version.max(MIN_PROTOCOL_VERSION) > version {
                    return Err(SessionError::UnsupportedVersion {
                        chosen: hello.version,
                    });
                }
                self.hello_seen = true;
                ReadyEvent::Hello(AgentInfo {
                    protocol_version: version,
                    agent_version: hello.agent_version,
                    limits: hello.limits,
                    security: hello.security,
                    bounds: hello.bounds,
                })
            }
            AgentFrame::Ready(report) if self.hello_seen && !self.done => {
                self.done = true;
                ReadyEvent::Ready(report)
            }
            other => {
                return Err(SessionError::Unexpected {
                    frame: FrameKind::of_agent(&other),
                    phase,
                })
            }
        };
        Ok(Input {
            consumed,
            event: Some(event),
        })
    }

    /// The agent closed the connection with `input_left` bytes unconsumed: fine after the report.
    pub fn handle_eof(&self, input_left: usize) -> Result<(), SessionError> {
        if self.done && input_left == 0 {
            return Ok(());
        }
        Err(SessionError::Disconnected {
            phase: self.phase(),
            mid_frame: input_left > 0,
        })
    }

    fn phase(&self) -> Phase {
        match (self.hello_seen, self.done) {
            (_, true) => Phase::Done,
            (true, false) => Phase::Idle,
            (false, false) => Phase::Hello,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{MAX_FRAME, NONCE_LEN};
    use crate::msg::{AgentHello, Bounds, Limits};

    const REPORT: ReadyReport = ReadyReport {
        cid: 3,
        init_started_us: 10,
        modules_us: 20,
        listening_us: 30,
        module_times: crate::StrList::new(b""),
    };

    #[test]
    fn an_announcement_reads_back_in_any_pieces() {
        let mut out = vec![0u8; MAX_FRAME];
        let config = AgentConfig {
            agent_version: "0.1.0",
            ..AgentConfig::DEFAULT
        };
        let n =
            encode_ready_announcement(&config, Security::Authenticated, REPORT, &mut out).unwrap();
        let bytes = &out[..n];
        for piece in 1..=n {
            let mut receiver = ReadyReceiver::new();
            let mut buffered = Vec::new();
            let mut events = Vec::new();
            for chunk in bytes.chunks(piece) {
                buffered.extend_from_slice(chunk);
                loop {
                    let input = receiver.handle_input(&buffered).unwrap();
                    match input.event {
                        Some(ReadyEvent::Hello(info)) => {
                            // The hello says what the agent's connections require, and the
                            // configured limits and bounds.
                            assert_eq!(info.security, Security::Authenticated);
                            assert_eq!(info.agent_version, "0.1.0");
                            assert_eq!(info.limits, config.limits);
                            assert_eq!(info.bounds, config.bounds);
                            events.push(info.protocol_version as u64)
                        }
                        Some(ReadyEvent::Ready(report)) => events.push(report.listening_us),
                        None => break,
                    }
                    buffered.drain(..input.consumed);
                }
            }
            assert_eq!(events, [PROTOCOL_VERSION as u64, 30], "piece {piece}");
            assert_eq!(receiver.handle_eof(buffered.len()), Ok(()));
        }
    }

    #[test]
    fn out_of_order_or_foreign_announcements_are_typed_errors() {
        let frame = |frame: AgentFrame<'_>| {
            let mut out = vec![0u8; 256];
            let n = encode_agent_frame(&frame, &mut out).unwrap();
            out.truncate(n);
            out
        };
        let report = frame(AgentFrame::Ready(REPORT));
        let mut receiver = ReadyReceiver::new();
        assert_eq!(
            receiver.handle_input(&report),
            Err(SessionError::Unexpected {
                frame: FrameKind::Ready,
                phase: Phase::Hello
            })
        );
        let hello = AgentHello {
            magic: *b"NOPE",
            min_version: MIN_PROTOCOL_VERSION,
            version: PROTOCOL_VERSION,
            agent_version: "",
            limits: Limits::CURRENT,
            nonce: crate::ByteArray([0; NONCE_LEN]),
            security: Security::Insecure,
            bounds: Bounds::default(),
        };
        let foreign = frame(AgentFrame::Hello(hello));
        assert_eq!(
            ReadyReceiver::new().handle_input(&foreign),
            Err(SessionError::NotFerry)
        );
        // An agent that speaks only newer versions, or only older ones.
        for (min_version, version) in [(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3), (1, 1)] {
            let other = frame(AgentFrame::Hello(AgentHello {
                magic: MAGIC,
                min_version,
                version,
                ..hello
            }));
            assert_eq!(
                ReadyReceiver::new().handle_input(&other),
                Err(SessionError::UnsupportedVersion { chosen: version })
            );
        }
        // One that also speaks newer versions is fine: both speak ours.
        let newer = frame(AgentFrame::Hello(AgentHello {
            magic: MAGIC,
            min_version: MIN_PROTOCOL_VERSION,
            version: PROTOCOL_VERSION + 1,
            ..hello
        }));
        let mut receiver = ReadyReceiver::new();
        let input = receiver.handle_input(&newer).unwrap();
        assert!(matches!(
            input.event,
            Some(ReadyEvent::Hello(AgentInfo {
                protocol_version: PROTOCOL_VERSION,
                ..
            }))
        ));
        // A second hello is out of order.
        assert_eq!(
            receiver.handle_input(&newer),
            Err(SessionError::Unexpected {
                frame: FrameKind::Hello,
                phase: Phase::Idle
            })
        );
        let receiver = ReadyReceiver::new();
        assert_eq!(
            receiver.handle_eof(0),
            Err(SessionError::Disconnected {
                phase: Phase::Hello,
                mid_frame: false
            })
        );
    }
}
