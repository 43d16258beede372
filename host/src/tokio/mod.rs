//! The async API (cargo feature `tokio`): the blocking API's operations and errors, on tokio.
//!
//! ```no_run
//! # async fn run() -> Result<(), ferry_host::Error> {
//! use ferry_host::tokio::Client;
//! use ferry_host::{Command, Event, Target};
//!
//! let target: Target = "vsock://3:1024".parse()?;
//! let client = Client::connect(&target).await?;
//! let mut execution = client.spawn(Command::new("uname").arg("-a")).await?;
//! while let Some(event) = execution.next_event().await? {
//!     match event {
//!         Event::Stdout(data) | Event::Stderr(data) => print!("{}", String::from_utf8_lossy(data)),
//!         Event::Exited(end) => println!("exited: {:?}", end.status),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! One connection per operation, as in the blocking API. No task is spawned: an [`Execution`]
//! drives its connection whenever it is polled (output, stdin credit, the end), and its
//! [`StdinWriter`] shares the protocol session with it through a lock and wakers. So poll the
//! execution while writing stdin (`join!`, `select!`, or two tasks), as with a child process's
//! pipes. Every protocol rule (hellos and proofs, credit, the order of frames, the handshake
//! deadline) is
//! [`ferry_wire::session::ClientSession`]'s; this module only moves bytes and wakes tasks.
//!
//! - *Backpressure:* output is read only while the execution is polled, one frame at a time, so
//!   a slow consumer slows the command; a stdin write is `Pending` until the agent grants credit.
//! - *Cancellation:* dropping an [`Execution`] before its [`crate::Event::Exited`] (for example
//!   by dropping the future that owns it) disconnects, and the agent kills the command's process
//!   group.
//! - *Authentication:* as in the blocking API, every connection opens with the agent's hello
//!   (its challenge), then ours with the proof of [`crate::ConnectOptions::secret`] and the
//!   operation in one write; the agent's proof is checked before anything it says about the
//!   operation is believed.
//! - *Timeouts:* [`crate::ConnectOptions::connect_timeout`] bounds connect, the hybrid-vsock
//!   handshake and the protocol's handshake (both hellos, both proofs), on tokio's clock; the
//!   runtime needs its time driver (`enable_time`) and its I/O driver (`enable_io`).

mod conn;
mod connect;
mod exec;

use std::sync::Arc;

use ::tokio::time::Instant;

pub use exec::{Controller, Execution, OutputReader, OutputStreams, OwnedEvent, StdinWriter};

use crate::conn::{new_session, BufferPool};
use crate::{AgentInfo, Command, ConnectOptions, Error, Health, Output, Security, Target};
use conn::{Conn, Operation};
use exec::Receiver;

/// A client for one agent, async. Cheap to clone; every operation opens its own connection.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    options: ConnectOptions,
    buffers: Arc<BufferPool>,
}

impl Client {
    /// Connects to `target` with default options and checks that an agent answers.
    pub async fn connect(target: &Target) -> Result<Client, Error> {
        Client::connect_with(target, ConnectOptions::default()).await
    }

    /// Connects to `target` and checks that an agent answers.
    pub async fn connect_with(target: &Target, options: ConnectOptions) -> Result<Client, Error> {
        let client = Client::new(target, options);
        client.health().await?;
        Ok(client)
    }

    /// A client that connects only when an operation runs (no up-front check).
    pub fn new(target: &Target, options: ConnectOptions) -> Client {
        Client {
            target: target.clone(),
            options,
            buffers: Arc::default(),
        }
    }

    /// The target this client talks to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Opens a fresh connection and completes the handshake (hellos, and both proofs when the
    /// agent requires the secret): is the agent up, is it ours, and how fast does it answer?
    pub async fn health(&self) -> Result<Health, Error> {
        let started = Instant::now();
        let (mut receiver, info) = self.open(Operation::None).await?;
        if info.security == Security::Authenticated {
            // Nothing else would bring the agent's proof: wait for it here (sending ours first).
            receiver.authenticated().await?;
        } else {
            receiver.flush().await?;
        }
        // A handshake-only conversation ends when the connection is dropped, here.
        Ok(Health {
            info,
            round_trip: started.elapsed(),
        })
    }

    /// Starts `command` and returns it running once the agent reports it started. Failing to
    /// start (no such program, not executable, bad directory) is an [`Error::Remote`] naming
    /// the cause.
    pub async fn spawn(&self, command: &Command) -> Result<Execution, Error> {
        // The session checks the request against the protocol's limits before anything is
        // sent; an agent with tighter ones refuses with `LimitExceeded`.
        let request = command.request()?;
        let (receiver, _info) = self
            .open(Operation::Exec(&request))
            .await
            .map_err(|err| command.explain(err))?;
        Execution::start(receiver, command.stdin_mode()).await
    }

    /// Ends every command the agent runs (every process in its commands' cgroup), whoever
    /// started them: the way back from a fork bomb or a runaway daemon. Returns how many
    /// processes were signalled when the agent knows (0 otherwise). An agent without a cgroup
    /// for its commands refuses with [`crate::ErrorCode::Unsupported`].
    pub async fn kill_all(&self) -> Result<u32, Error> {
        let (mut receiver, _info) = self.open(Operation::KillAll).await?;
        receiver.done().await
    }

    /// Runs `command` to the end and returns everything it printed and how it ended.
    pub async fn output(&self, command: &Command) -> Result<Output, Error> {
        self.spawn(command).await?.collect().await
    }

    /// Connects, waits for the agent's hello (the agent speaks first: its hello carries the
    /// challenge our proof answers), and queues our hello, proof and `operation` behind it; the
    /// receiver's next poll sends them in one write. Connect and handshake share
    /// `connect_timeout`.
    async fn open(&self, operation: Operation<'_, '_>) -> Result<(Receiver, AgentInfo), Error> {
        if let Operation::Exec(request) = operation {
            // Refused before a connection is made: a bad request costs nothing.
            request
                .validate()
                .map_err(|err| Error::InvalidRequest(err.message.into()))?;
        }
        let timeout = self.options.connect_timeout;
        // The handshake's deadline counts from before the connect.
        let epoch = Instant::now();
        let session = new_session(&self.options, timeout)?;
        let stream = connect::open(&self.target, &self.options, epoch + timeout).await?;
        let conn = Arc::new(Conn::new(stream, session, epoch));
        let mut receiver = Receiver::new(conn, &self.buffers);
        let info = receiver.hello().await?;
        receiver.conn().lock().queue_opening(operation)?;
        Ok((receiver, info))
    }
}
