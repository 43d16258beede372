//! The entry point: a client bound to one agent. It keeps up to `ConnectOptions::max_idle`
//! idle connections (protocol 5 keep-alive: an operation on one pays no connect, hello or
//! proof), shared by its clones and threads; an operation takes one, or opens its own.

use std::sync::Arc;
use std::time::Duration;

use crate::command::Command;
use crate::conn::{open_timed, AgentInfo, BufferPool, Connection, IdlePool, Operation, Received};
use crate::error::Error;
use crate::exec::{Execution, Output};
use crate::target::{ConnectOptions, Target};
use crate::transfer::{Download, Get, Put, Transferred, Upload};

/// A client for one agent.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    options: ConnectOptions,
    buffers: Arc<BufferPool>,
    /// Connections whose operation ended cleanly, for the next operations.
    idle: Arc<IdlePool>,
}

/// The answer to a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// What the agent said about itself.
    pub info: AgentInfo,
    /// Connect plus hello round trip.
    pub round_trip: Duration,
}

impl Client {
    /// Connects to `target` with default options and checks that an agent answers.
    pub fn connect(target: &Target) -> Result<Client, Error> {
        Client::connect_with(target, ConnectOptions::default())
    }

    /// Connects to `target` and checks that an agent answers.
    pub fn connect_with(target: &Target, options: ConnectOptions) -> Result<Client, Error> {
        let client = Client::new(target, options);
        client.health()?;
        Ok(client)
    }

    /// A client that connects only when an operation runs (no up-front check): one connection
    /// per operation instead of two, for callers that run one command.
    pub fn new(target: &Target, options: ConnectOptions) -> Client {
        Client {
            target: target.clone(),
            idle: Arc::new(IdlePool::new(options.max_idle)),
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
    pub fn health(&self) -> Result<Health, Error> {
        let (_conn, info, round_trip) =
            open_timed(&self.target, &self.options, Some(&self.buffers))?;
        Ok(Health { info, round_trip })
    }

    /// Starts `command` and returns it running: read its output as events, feed its stdin.
    /// Failing to start (no such program, not executable, bad directory) is an
    /// [`Error::Remote`] naming the cause.
    pub fn spawn(&self, command: &Command) -> Result<Execution, Error> {
        // The session checks the request against the protocol's limits before anything is
        // sent; an agent with tighter ones refuses with `LimitExceeded`.
        let request = command.request()?;
        let (conn, info) = self
            .open_operation(Operation::Exec(&request))
            .map_err(|err| command.explain(err))?;
        Execution::start(conn, info, command.stdin_mode())
    }

    /// Ends every command the agent runs (every process in its commands' cgroup), whoever
    /// started them: the way back from a fork bomb or a runaway daemon. Returns how many
    /// processes were signalled when the agent knows (0 otherwise). An agent without a cgroup
    /// for its commands refuses with [`crate::ErrorCode::Unsupported`].
    pub fn kill_all(&self) -> Result<u32, Error> {
        let (mut conn, _info) = self.open_operation(Operation::KillAll)?;
        match conn.receive()? {
            Received::Done(count) => Ok(count),
            other => Err(crate::conn::out_of_order(
                &other,
                "instead of a done record",
            )),
        }
    }

    /// Writes what `content` gives (to its end) as `put` says, and waits for the agent to check
    /// its SHA-256 and commit it. Memory stays bounded whatever the size: the content is read
    /// as the agent grants credit. An agent's refusal (a missing directory, a permission, its
    /// maximum file size, no space) is an [`Error::Remote`] with its code and errno.
    pub fn put(&self, put: &Put, content: impl std::io::Read) -> Result<Transferred, Error> {
        let mut upload = self.upload(put)?;
        upload.send_from(content)?;
        upload.finish()
    }

    /// Starts a put and returns it to be written to ([`Upload`] is a [`std::io::Write`]), for
    /// content produced as it goes (a tar stream being built). [`Upload::finish`] ends it.
    pub fn upload(&self, put: &Put) -> Result<Upload, Error> {
        let request = put.request()?;
        let (conn, _info) = self.open_operation(Operation::Put(&request))?;
        Ok(Upload::new(conn, put))
    }

    /// Reads what `get` names into `sink`, straight from the receive buffer, and checks the
    /// agent's SHA-256 and byte count against what arrived ([`Error::IntegrityMismatch`]). A
    /// refusal (no such file, not a regular file, a permission) comes before any byte is
    /// written to `sink`.
    pub fn get(&self, get: &Get, sink: impl std::io::Write) -> Result<Transferred, Error> {
        self.download(get)?.copy_to(sink)
    }

    /// Starts a get and returns once the agent described the file (or refused): look at
    /// [`Download::file_info`] before deciding where the content goes, then read it
    /// ([`Download`] is a [`std::io::Read`]) or [`Download::copy_to`] a writer.
    pub fn download(&self, get: &Get) -> Result<Download, Error> {
        let request = get.request()?;
        let (conn, _info) = self.open_operation(Operation::Get(&request))?;
        Download::start(conn, get)
    }

    /// Starts `operation` on an idle connection, else on a new one (its request goes out
    /// behind the handshake).
    pub(crate) fn open_operation(
        &self,
        operation: Operation<'_, '_>,
    ) -> Result<(Connection, AgentInfo), Error> {
        operation.validate()?;
        if let Some(reused) = self.idle.reuse(operation, Some(&self.buffers))? {
            return Ok(reused);
        }
        let (mut conn, info) =
            Connection::open_with(&self.target, &self.options, Some(&self.buffers), operation)?;
        // The agent ends the connection after a transfer (it drops to the request's user) and
        // after a shutdown: those are not kept.
        let ends = matches!(
            operation,
            Operation::Put(_) | Operation::Get(_) | Operation::Shutdown(_)
        );
        if !ends {
            conn.keep_idle_in(&self.idle);
        }
        Ok((conn, info))
    }

    /// Runs `command` to the end and returns everything it printed and how it ended.
    pub fn output(&self, command: &Command) -> Result<Output, Error> {
        self.spawn(command)?.collect()
    }
}
