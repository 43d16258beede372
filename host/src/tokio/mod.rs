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
//! pipes. Every protocol rule (hello, credit, the order of frames, the hello deadline) is
//! [`ferry_wire::session::ClientSession`]'s; this module only moves bytes and wakes tasks.
//!
//! - *Backpressure:* output is read only while the execution is polled, one frame at a time, so
//!   a slow consumer slows the command; a stdin write is `Pending` until the agent grants credit.
//! - *Cancellation:* dropping an [`Execution`] before its [`crate::Event::Exited`] (for example
//!   by dropping the future that owns it) disconnects, and the agent kills the command's process
//!   group.
//! - *Timeouts:* [`crate::ConnectOptions::connect_timeout`] bounds connect, the hybrid-vsock
//!   handshake and the agent's hello, on tokio's clock; the runtime needs its time driver
//!   (`enable_time`) and its I/O driver (`enable_io`).

mod conn;
mod connect;
mod exec;

use std::sync::Arc;

use ::tokio::time::Instant;

pub use exec::{Execution, OutputReader, OutputStreams, OwnedEvent, StdinWriter};

use crate::conn::BufferPool;
use crate::{Command, ConnectOptions, Error, Health, Output, Target};
use conn::{Conn, Opening};

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

    /// Opens a fresh connection and exchanges hellos: is the agent up, and how fast does it
    /// answer?
    pub async fn health(&self) -> Result<Health, Error> {
        let started = Instant::now();
        let conn = self
            .open(Opening::new(self.options.connect_timeout, None)?)
            .await?;
        let info = exec::Receiver::new(conn, &self.buffers).hello().await?;
        // A hello-only conversation ends when the connection is dropped, here.
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
        let opening = Opening::new(self.options.connect_timeout, Some(&request))
            .map_err(|err| command.explain(err))?;
        let conn = self.open(opening).await?;
        Execution::start(conn, &self.buffers, command.stdin_mode()).await
    }

    /// Runs `command` to the end and returns everything it printed and how it ended.
    pub async fn output(&self, command: &Command) -> Result<Output, Error> {
        self.spawn(command).await?.collect().await
    }

    async fn open(&self, opening: Opening) -> Result<Arc<Conn>, Error> {
        let deadline = opening.deadline(self.options.connect_timeout);
        let stream = connect::open(&self.target, &self.options, deadline).await?;
        Ok(Arc::new(Conn::new(stream, opening)))
    }
}
