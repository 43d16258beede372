//! Protocol 5: several operations on one connection, between the two sessions in memory.

use super::*;
use crate::limits::MAX_FRAME;
use crate::msg::{ErrorCode, ExecRequest, ExitStatus, Limits, StdinMode, StrList};

const IDLE_MS: u32 = 1_000;

fn config(idle_ms: u32) -> AgentConfig {
    AgentConfig {
        limits: Limits {
            idle_ms,
            ..Limits::CURRENT
        },
        ..AgentConfig::DEFAULT
    }
}

fn exec(stdin: StdinMode) -> ExecRequest<'static> {
    ExecRequest {
        argv: StrList::new(b"true\0"),
        env: StrList::new(b""),
        clean_env: false,
        cwd: None,
        stdin,
        user: None,
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: None,
        kill_tree_on_exit: false,
        max_output: 0,
    }
}

/// A connected pair, hellos exchanged (insecure), the client ready for its first request.
struct Pair {
    agent: AgentSession,
    client: ClientSession,
    to_agent: Vec<u8>,
    to_client: Vec<u8>,
}

impl Pair {
    fn new(idle_ms: u32) -> Pair {
        let agent = AgentSession::new(
            config(idle_ms),
            0,
            AgentAuth {
                nonce: [1; 32],
                secret: None,
            },
        );
        let client = ClientSession::new(
            0,
            None,
            ClientAuth {
                nonce: [2; 32],
                secret: None,
            },
        );
        let mut pair = Pair {
            agent,
            client,
            to_agent: Vec::new(),
            to_client: Vec::new(),
        };
        pair.agent_sends();
        assert!(matches!(
            pair.client_reads().as_slice(),
            [ClientEvent::HelloAccepted(_)]
        ));
        pair
    }

    fn agent_sends(&mut self) {
        let mut out = vec![0u8; MAX_FRAME];
        loop {
            let n = self.agent.poll_transmit(&mut out).unwrap();
            if n == 0 {
                break;
            }
            self.to_client.extend_from_slice(&out[..n]);
        }
    }

    /// Everything the client session reports for what the agent sent, owned as kinds.
    fn client_reads(&mut self) -> Vec<ClientEvent<'static>> {
        let mut events = Vec::new();
        let bytes = std::mem::take(&mut self.to_client);
        let bytes: &'static [u8] = Vec::leak(bytes);
        let mut rest = bytes;
        while let Ok(input) = self.client.handle_input(rest) {
            if input.consumed == 0 {
                break;
            }
            events.extend(input.event);
            rest = &rest[input.consumed..];
        }
        events
    }

    fn start(&mut self, request: &ExecRequest<'_>) {
        let mut out = vec![0u8; MAX_FRAME * 2];
        let n = self.client.start_exec(request, &mut out).unwrap();
        self.to_agent.extend_from_slice(&out[..n]);
    }

    /// The agent reads what the client sent; returns the events' debug names.
    fn agent_reads(&mut self, now: Micros) -> Result<Vec<String>, SessionError> {
        let bytes = std::mem::take(&mut self.to_agent);
        let mut rest = &bytes[..];
        let mut events = Vec::new();
        loop {
            let input = self.agent.handle_input(rest, now)?;
            if input.consumed == 0 {
                self.to_agent = rest.to_vec();
                return Ok(events);
            }
            if let Some(event) = input.event {
                events.push(format!("{event:?}"));
            }
            rest = &rest[input.consumed..];
        }
    }

    /// One exec, start to end, at `now`: the agent runs it, the client sees it end.
    fn run_exec(&mut self, now: Micros) {
        self.start(&exec(StdinMode::Null));
        let events = self.agent_reads(now).unwrap();
        assert!(events.last().unwrap().starts_with("Exec"), "{events:?}");
        self.agent.started(7, now).unwrap();
        self.agent.child_exited(ExitStatus::Code(0), now).unwrap();
        self.agent.finish(now).unwrap();
        self.agent_sends();
        assert!(self.agent.can_continue());
        self.agent.next_operation(now).unwrap();
        let events = self.client_reads();
        assert!(
            matches!(events.last(), Some(ClientEvent::Exited(_))),
            "{events:?}"
        );
        assert!(self.client.is_finished());
        assert!(self.client.is_reusable());
        assert_eq!(self.client.phase(), Phase::Idle);
        assert_eq!(self.agent.phase(), Phase::Idle);
    }
}

#[test]
fn two_and_many_operations_on_one_connection() {
    let mut pair = Pair::new(IDLE_MS);
    for i in 0..100 {
        pair.run_exec(i * 1_000);
    }
    // Other operations follow an exec the same way.
    let mut out = [0u8; 256];
    let n = pair.client.start_kill_all(&mut out).unwrap();
    pair.to_agent.extend_from_slice(&out[..n]);
    assert_eq!(pair.agent_reads(0).unwrap(), ["KillAll"]);
    pair.agent.done(3, 0).unwrap();
    pair.agent_sends();
    assert!(pair.agent.can_continue());
    assert!(matches!(
        pair.client_reads().as_slice(),
        [ClientEvent::Done(_)]
    ));
    assert!(pair.client.is_reusable());
}

#[test]
fn idle_ms_zero_is_one_operation_per_connection() {
    let mut pair = Pair::new(0);
    pair.start(&exec(StdinMode::Null));
    pair.agent_reads(0).unwrap();
    pair.agent.started(7, 0).unwrap();
    pair.agent.child_exited(ExitStatus::Code(0), 0).unwrap();
    pair.agent.finish(0).unwrap();
    pair.agent_sends();
    assert!(!pair.agent.can_continue());
    assert!(pair.agent.is_closed());
    pair.client_reads();
    assert!(pair.client.is_finished());
    assert!(!pair.client.is_reusable());
    assert_eq!(pair.client.phase(), Phase::Done);
    let mut out = [0u8; 256];
    assert_eq!(
        pair.client.start_kill_all(&mut out),
        Err(SessionError::InvalidState)
    );
}

#[test]
fn a_refused_request_keeps_the_connection() {
    let mut pair = Pair::new(IDLE_MS);
    pair.start(&exec(StdinMode::Null));
    pair.agent_reads(0).unwrap();
    let refusal = Refusal::os(ErrorCode::NotFound, 2, "no such file");
    pair.agent.refuse(refusal, 0).unwrap();
    pair.agent_sends();
    assert!(pair.agent.can_continue());
    pair.agent.next_operation(0).unwrap();
    assert!(matches!(
        pair.client_reads().as_slice(),
        [ClientEvent::Refused(_)]
    ));
    assert!(pair.client.is_reusable());
    // The audit facts of the refused operation are gone with it.
    assert_eq!(pair.agent.refusal_code(), None);
    pair.run_exec(10);
}

#[test]
fn a_refusal_after_stdin_was_sent_ends_the_connection_for_the_client() {
    let mut pair = Pair::new(IDLE_MS);
    pair.start(&exec(StdinMode::Pipe));
    let mut out = vec![0u8; MAX_FRAME];
    let sent = pair.client.send_stdin(b"abc", &mut out).unwrap();
    pair.to_agent.extend_from_slice(&out[..sent.written]);
    let events = pair.agent_reads(0).unwrap();
    assert_eq!(events.len(), 3, "hello, exec, stdin: {events:?}");
    pair.agent
        .refuse(Refusal::new(ErrorCode::NotFound, "no"), 0)
        .unwrap();
    pair.agent_sends();
    pair.client_reads();
    assert!(pair.client.is_finished());
    assert!(
        !pair.client.is_reusable(),
        "its stdin may still be on its way"
    );
}

#[test]
fn a_breach_closes_the_connection() {
    let mut pair = Pair::new(IDLE_MS);
    pair.run_exec(0);
    pair.to_agent
        .extend_from_slice(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
    assert_eq!(pair.agent_reads(5), Err(SessionError::Malformed));
    pair.agent_sends();
    assert!(!pair.agent.can_continue());
    assert!(pair.agent.is_closed());
    let events = pair.client_reads();
    assert!(matches!(events.as_slice(), [ClientEvent::Refused(_)]));
    assert!(!pair.client.is_reusable());
}

#[test]
fn the_idle_deadline_closes_silently_and_the_handshake_deadline_is_the_first_requests() {
    let mut pair = Pair::new(IDLE_MS);
    pair.run_exec(0);
    let idle = u64::from(IDLE_MS) * 1000;
    assert_eq!(pair.agent.poll_timeout(), Some(idle));
    assert!(pair.agent.handle_timeout(idle - 1).is_ok());
    assert_eq!(
        pair.agent.handle_timeout(idle),
        Err(SessionError::TimedOut { phase: Phase::Idle })
    );
    assert!(pair.agent.is_closed());
    pair.agent_sends();
    assert!(pair.to_client.is_empty(), "not a byte: no error frame");
    // The client sees the end as clean.
    assert_eq!(pair.client.handle_eof(0), Ok(()));
    assert!(!pair.client.is_reusable());
}

#[test]
fn stale_stdin_and_credit_are_refused_in_the_next_operation() {
    let mut pair = Pair::new(IDLE_MS);
    pair.run_exec(0);
    // The client has nothing to send stdin for.
    let mut out = vec![0u8; MAX_FRAME];
    assert_eq!(
        pair.client.send_stdin(b"late", &mut out),
        Err(SessionError::InvalidState)
    );
    // Stdin arriving at an idle agent is a breach.
    let n =
        crate::encode_client_frame(&ClientFrame::Stdin(crate::Bytes(b"late")), &mut out).unwrap();
    pair.to_agent.extend_from_slice(&out[..n]);
    assert!(matches!(
        pair.agent_reads(1),
        Err(SessionError::Unexpected { .. })
    ));
    // Credit arriving at an idle client is refused.
    let mut pair = Pair::new(IDLE_MS);
    pair.run_exec(0);
    let n = crate::encode_agent_frame(&crate::AgentFrame::StdinCredit(4), &mut out).unwrap();
    assert!(matches!(
        pair.client.handle_input(&out[..n]),
        Err(SessionError::Unexpected { .. })
    ));
    // In the next operation, credit beyond what it sent is refused too.
    let mut pair = Pair::new(IDLE_MS);
    pair.run_exec(0);
    pair.start(&exec(StdinMode::Pipe));
    pair.agent_reads(0).unwrap();
    pair.agent.started(9, 0).unwrap();
    pair.agent_sends();
    pair.client_reads();
    assert_eq!(
        pair.client.stdin_credit(),
        crate::limits::STDIN_WINDOW,
        "the whole window again"
    );
    assert!(matches!(
        pair.client.handle_input(&out[..n]),
        Err(SessionError::CreditExceeded)
    ));
}

#[test]
fn a_request_while_the_last_operation_runs_is_refused() {
    let mut pair = Pair::new(IDLE_MS);
    pair.start(&exec(StdinMode::Null));
    pair.agent_reads(0).unwrap();
    pair.agent.started(7, 0).unwrap();
    let mut out = [0u8; 256];
    assert_eq!(
        pair.client.start_kill_all(&mut out),
        Err(SessionError::InvalidState)
    );
    let n = crate::encode_client_frame(&ClientFrame::KillAll, &mut out).unwrap();
    pair.to_agent.extend_from_slice(&out[..n]);
    assert!(matches!(
        pair.agent_reads(0),
        Err(SessionError::Unexpected { .. })
    ));
    assert!(!pair.agent.can_continue());
    // And before the driver released the last one, the next request waits in its buffer.
    let mut pair = Pair::new(IDLE_MS);
    pair.start(&exec(StdinMode::Null));
    pair.agent_reads(0).unwrap();
    pair.agent.started(7, 0).unwrap();
    pair.agent.child_exited(ExitStatus::Code(0), 0).unwrap();
    pair.agent.finish(0).unwrap();
    pair.agent_sends();
    pair.client_reads();
    pair.start(&exec(StdinMode::Null));
    assert_eq!(pair.agent_reads(0).unwrap(), Vec::<String>::new());
    pair.agent.next_operation(0).unwrap();
    assert!(pair.agent_reads(0).unwrap()[0].starts_with("Exec"));
}

/// A start refused for its buffer sent nothing, not even the pieces it had encoded: a later
/// request refused before it started still leaves the connection reusable (the client counted
/// the unsent pieces as traffic; found while writing the protocol-5 fuzz model).
#[test]
fn a_start_that_did_not_fit_leaves_no_traffic_behind() {
    let mut pair = Pair::new(IDLE_MS);
    let argv = vec![b'a'; crate::limits::MAX_INLINE_LIST * 2]
        .into_iter()
        .chain([0])
        .collect::<Vec<u8>>();
    let large = ExecRequest {
        argv: StrList::new(&argv),
        ..exec(StdinMode::Null)
    };
    // Room for our hello and the pieces, not for the exec frame after them.
    let mut small = vec![0u8; ClientSession::exec_buffer_len(&large) - MAX_FRAME + 1_000];
    assert_eq!(
        pair.client.start_exec(&large, &mut small),
        Err(SessionError::BufferTooSmall)
    );
    pair.start(&exec(StdinMode::Null));
    pair.agent_reads(0).unwrap();
    let refusal = Refusal::os(ErrorCode::NotFound, 2, "no such file");
    pair.agent.refuse(refusal, 0).unwrap();
    pair.agent_sends();
    assert!(pair.agent.can_continue());
    pair.agent.next_operation(0).unwrap();
    assert!(matches!(
        pair.client_reads().as_slice(),
        [ClientEvent::Refused(_)]
    ));
    assert!(pair.client.is_reusable(), "the unsent pieces counted");
    pair.run_exec(10);
}
