//! The operations on the guest itself: what it is (`info`), powering it off or rebooting it,
//! setting its clock, feeding its entropy pool. Owned types converted from the wire's at the
//! edge, and the stable JSON document `ferry info --json` prints (docs/cli.md names its fields).
//!
//! NOTE: no serde here: serializing `String`s needs serde's `alloc` (and serde_json its `std` or
//! `alloc`), and features unify across the workspace with the no_std agent's host build, which
//! then fails to link (no global allocator, or a second `panic_impl`). [`SystemReport::to_json`]
//! writes the document by hand.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_wire::{Bounds, Limits, Security, ShutdownRequest, Timestamp};

use crate::client::Client;
use crate::conn::{out_of_order, AgentInfo, Operation, Received};
use crate::error::Error;

/// The guest as its agent describes it ([`Client::info`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SystemReport {
    /// `uname -n`.
    pub hostname: String,
    /// `uname -r`.
    pub kernel_release: String,
    /// `uname -v`.
    pub kernel_version: String,
    /// `uname -m`.
    pub machine: String,
    /// Milliseconds since the guest booted (`CLOCK_BOOTTIME`).
    pub uptime_ms: u64,
    /// The guest's realtime clock when it answered, in milliseconds since the Unix epoch.
    pub clock_ms: i64,
    /// CPUs the agent may run on.
    pub cpus: u32,
    /// The first CPU's model name (empty when the kernel names none, as on many arm64 guests).
    pub cpu_model: String,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// `MemTotal`, bytes.
    pub memory_total: u64,
    /// `MemAvailable`, bytes.
    pub memory_available: u64,
    /// Processes and threads.
    pub processes: u32,
    /// Mounted file systems, in mount order.
    pub mounts: Vec<Mount>,
    /// Network interfaces.
    pub interfaces: Vec<Interface>,
    /// The agent itself.
    pub agent: AgentReport,
}

/// A mounted file system and its space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: String,
    pub target: String,
    pub fstype: String,
    pub read_only: bool,
    /// Bytes.
    pub total: u64,
    /// Free bytes.
    pub free: u64,
    /// Free bytes an unprivileged user may use.
    pub available: u64,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub up: bool,
    pub mtu: u32,
    /// `aa:bb:cc:dd:ee:ff`, empty when it has none.
    pub mac: String,
    /// IPv4 addresses as `ADDRESS/PREFIX`.
    pub addresses: Vec<String>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The agent that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReport {
    pub version: String,
    /// The listener's pid (1 as init).
    pub pid: u32,
    /// The listener's resident memory, bytes.
    pub rss: u64,
    /// The protocol version of this connection.
    pub protocol: u16,
    /// `init` (PID 1) or `service`.
    pub mode: &'static str,
    /// `authenticated` or `insecure`.
    pub security: &'static str,
    pub limits: Limits,
    pub bounds: Bounds,
}

/// What a time sync did ([`Client::time_sync`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockStep {
    /// The guest's clock before, as it said.
    pub previous: SystemTime,
    /// What it was set to: the host's clock when the request was encoded.
    pub set_to: SystemTime,
}

impl ClockStep {
    /// How far the guest's clock moved, in seconds (positive: forward).
    pub fn step_seconds(&self) -> f64 {
        match self.set_to.duration_since(self.previous) {
            Ok(forward) => forward.as_secs_f64(),
            Err(backward) => -backward.duration().as_secs_f64(),
        }
    }
}

/// What the info operation's first frame says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct System {
    hostname: String,
    kernel_release: String,
    kernel_version: String,
    machine: String,
    uptime_ms: u64,
    clock_ms: i64,
    cpus: u32,
    cpu_model: String,
    load: [f64; 3],
    memory_total: u64,
    memory_available: u64,
    processes: u32,
    pid: u32,
    rss: u64,
}

impl System {
    pub(crate) fn from_wire(info: &ferry_wire::SystemInfo<'_>) -> System {
        System {
            hostname: info.hostname.to_owned(),
            kernel_release: info.kernel_release.to_owned(),
            kernel_version: info.kernel_version.to_owned(),
            machine: info.machine.to_owned(),
            uptime_ms: info.uptime_ms,
            clock_ms: info
                .now
                .secs
                .saturating_mul(1000)
                .saturating_add(i64::from(info.now.nanos / 1_000_000)),
            cpus: info.cpus,
            cpu_model: info.cpu_model.to_owned(),
            load: info.load.map(|hundredths| f64::from(hundredths) / 100.0),
            memory_total: info.memory_total,
            memory_available: info.memory_available,
            processes: info.processes,
            pid: info.agent_pid,
            rss: info.agent_rss,
        }
    }
}

impl Mount {
    pub(crate) fn from_wire(mount: &ferry_wire::MountInfo<'_>) -> Mount {
        Mount {
            source: String::from_utf8_lossy(mount.source.0).into_owned(),
            target: String::from_utf8_lossy(mount.target.0).into_owned(),
            fstype: mount.fstype.to_owned(),
            read_only: mount.read_only,
            total: mount.total,
            free: mount.free,
            available: mount.available,
        }
    }
}

impl Interface {
    pub(crate) fn from_wire(interface: &ferry_wire::InterfaceInfo<'_>) -> Interface {
        let mac: Vec<String> = interface.mac.0.iter().map(|b| format!("{b:02x}")).collect();
        Interface {
            name: interface.name.to_owned(),
            up: interface.up,
            mtu: interface.mtu,
            mac: mac.join(":"),
            addresses: interface
                .addresses
                .entries()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
            rx_bytes: interface.rx_bytes,
            tx_bytes: interface.tx_bytes,
        }
    }
}

/// The host's realtime clock now, for a time sync.
pub(crate) fn realtime_now() -> Timestamp {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        secs: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
        nanos: now.subsec_nanos(),
    }
}

fn to_system_time(time: Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(time.nanos.min(999_999_999)));
    if time.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(time.secs.unsigned_abs()) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(time.secs.unsigned_abs()) + nanos
    }
}

impl Client {
    /// Describes the guest: kernel, uptime, clock, CPUs, memory, mounts, interfaces, and the
    /// agent that answered.
    pub fn info(&self) -> Result<SystemReport, Error> {
        let (mut conn, hello) = self.open_operation(Operation::Info)?;
        let system = match conn.receive()? {
            Received::System(system) => system,
            other => return Err(out_of_order(&other, "instead of system information")),
        };
        let mut mounts = Vec::new();
        let mut interfaces = Vec::new();
        loop {
            match conn.receive()? {
                Received::Mount(mount) => mounts.push(mount),
                Received::Interface(interface) => interfaces.push(interface),
                Received::Done(_) => break,
                other => return Err(out_of_order(&other, "during system information")),
            }
        }
        Ok(SystemReport::new(system, mounts, interfaces, &hello))
    }

    /// Powers the guest off (or reboots it): the agent acknowledges, then every process gets
    /// `SIGTERM`, `SIGKILL` after `grace`, file systems are synced and unmounted. Returns once
    /// the agent acknowledged. Privileged: the agent's policy (`allow_shutdown`) decides.
    pub fn shutdown(&self, reboot: bool, grace: Duration) -> Result<(), Error> {
        let grace_ms = u32::try_from(grace.as_millis())
            .ok()
            .filter(|ms| *ms <= ferry_wire::limits::MAX_SHUTDOWN_GRACE_MS)
            .ok_or_else(|| Error::InvalidRequest("shutdown grace longer than 10 minutes".into()))?;
        let request = ShutdownRequest { reboot, grace_ms };
        let (mut conn, _) = self.open_operation(Operation::Shutdown(request))?;
        match conn.receive()? {
            Received::Done(_) => Ok(()),
            other => Err(out_of_order(&other, "instead of an acknowledgement")),
        }
    }

    /// Sets the guest's realtime clock to the host's, read as late as possible (when the
    /// request is encoded, right after the agent's hello). Privileged, like shutdown.
    pub fn time_sync(&self) -> Result<ClockStep, Error> {
        let sent = OnceLock::new();
        let (mut conn, _) = self.open_operation(Operation::TimeSync(&sent))?;
        match conn.receive()? {
            Received::ClockSet(previous) => Ok(ClockStep {
                previous: to_system_time(previous),
                set_to: to_system_time(sent.get().copied().unwrap_or_else(realtime_now)),
            }),
            other => Err(out_of_order(&other, "instead of the clock's report")),
        }
    }

    /// Mixes `bytes` random bytes of the host's (`getrandom`, 1 to 512) into the guest's
    /// entropy pool and credits them. Privileged, like shutdown. Returns the bytes added.
    pub fn reseed(&self, bytes: usize) -> Result<u32, Error> {
        if !(1..=ferry_wire::limits::MAX_RESEED).contains(&bytes) {
            return Err(Error::InvalidRequest("reseed takes 1 to 512 bytes".into()));
        }
        let mut random = vec![0u8; bytes];
        getrandom::fill(&mut random)
            .map_err(|err| Error::Io(std::io::Error::other(format!("getrandom: {err}"))))?;
        let (mut conn, _) = self.open_operation(Operation::Reseed(&random))?;
        match conn.receive()? {
            Received::Done(count) => Ok(count),
            other => Err(out_of_order(&other, "instead of a done record")),
        }
    }
}

impl SystemReport {
    fn new(
        system: System,
        mounts: Vec<Mount>,
        interfaces: Vec<Interface>,
        hello: &AgentInfo,
    ) -> Self {
        SystemReport {
            hostname: system.hostname,
            kernel_release: system.kernel_release,
            kernel_version: system.kernel_version,
            machine: system.machine,
            uptime_ms: system.uptime_ms,
            clock_ms: system.clock_ms,
            cpus: system.cpus,
            cpu_model: system.cpu_model,
            load: system.load,
            memory_total: system.memory_total,
            memory_available: system.memory_available,
            processes: system.processes,
            mounts,
            interfaces,
            agent: AgentReport {
                version: hello.agent_version.clone(),
                pid: system.pid,
                rss: system.rss,
                protocol: hello.protocol_version,
                mode: if system.pid == 1 { "init" } else { "service" },
                security: match hello.security {
                    Security::Authenticated => "authenticated",
                    Security::Insecure => "insecure",
                },
                limits: hello.limits,
                bounds: hello.bounds,
            },
        }
    }

    /// When the guest booted, in milliseconds since the Unix epoch (its clock less its uptime).
    pub fn boot_time_ms(&self) -> i64 {
        self.clock_ms
            .saturating_sub(i64::try_from(self.uptime_ms).unwrap_or(i64::MAX))
    }

    /// The stable JSON document of `ferry info --json` (docs/cli.md): sizes in bytes, times as
    /// seconds (`*_s`, with milliseconds as decimals) and RFC 3339 UTC text.
    pub fn to_json(&self) -> String {
        let mut out = Json::default();
        out.open('{');
        out.field("hostname").string(&self.hostname);
        out.field("kernel_release").string(&self.kernel_release);
        out.field("kernel_version").string(&self.kernel_version);
        out.field("machine").string(&self.machine);
        out.field("uptime_s").millis(self.uptime_ms as i64);
        out.field("boot_time").string(&rfc3339(self.boot_time_ms()));
        out.field("boot_time_s").millis(self.boot_time_ms());
        out.field("clock").string(&rfc3339(self.clock_ms));
        out.field("clock_s").millis(self.clock_ms);
        out.field("cpus").number(self.cpus);
        out.field("cpu_model").string(&self.cpu_model);
        out.field("load").open('[');
        for load in self.load {
            out.item().raw(&format!("{load:.2}"));
        }
        out.close(']');
        out.field("memory_total").number(self.memory_total);
        out.field("memory_available").number(self.memory_available);
        out.field("processes").number(self.processes);
        out.field("mounts").open('[');
        for mount in &self.mounts {
            out.item().open('{');
            out.field("source").string(&mount.source);
            out.field("target").string(&mount.target);
            out.field("fstype").string(&mount.fstype);
            out.field("read_only").boolean(mount.read_only);
            out.field("total").number(mount.total);
            out.field("free").number(mount.free);
            out.field("available").number(mount.available);
            out.close('}');
        }
        out.close(']');
        out.field("interfaces").open('[');
        for interface in &self.interfaces {
            out.item().open('{');
            out.field("name").string(&interface.name);
            out.field("up").boolean(interface.up);
            out.field("mtu").number(interface.mtu);
            out.field("mac").string(&interface.mac);
            out.field("addresses").open('[');
            for address in &interface.addresses {
                out.item().string(address);
            }
            out.close(']');
            out.field("rx_bytes").number(interface.rx_bytes);
            out.field("tx_bytes").number(interface.tx_bytes);
            out.close('}');
        }
        out.close(']');
        let agent = &self.agent;
        out.field("agent").open('{');
        out.field("version").string(&agent.version);
        out.field("pid").number(agent.pid);
        out.field("rss").number(agent.rss);
        out.field("protocol").number(agent.protocol);
        out.field("mode").string(agent.mode);
        out.field("security").string(agent.security);
        let limits = &agent.limits;
        out.field("limits").open('{');
        out.field("max_frame_body").number(limits.max_frame_body);
        out.field("max_data").number(limits.max_data);
        out.field("max_argv_bytes").number(limits.max_argv_bytes);
        out.field("max_args").number(limits.max_args);
        out.field("max_env_bytes").number(limits.max_env_bytes);
        out.field("max_env_vars").number(limits.max_env_vars);
        out.field("max_path").number(limits.max_path);
        out.field("stdin_window").number(limits.stdin_window);
        out.field("max_user").number(limits.max_user);
        out.field("max_arg_len").number(limits.max_arg_len);
        out.field("keepalive_ms").number(limits.keepalive_ms);
        out.close('}');
        let bounds = &agent.bounds;
        out.field("bounds").open('{');
        out.field("max_runtime_s").number(bounds.max_runtime_s);
        out.field("max_output").number(bounds.max_output);
        out.field("max_file_size").number(bounds.max_file_size);
        out.field("max_connections").number(bounds.max_connections);
        out.field("handshake_timeout_ms")
            .number(bounds.handshake_timeout_ms);
        out.field("memory_max").number(bounds.memory_max);
        out.field("pids_max").number(bounds.pids_max);
        out.field("cgroup").boolean(bounds.cgroup);
        out.field("default_uid").number(bounds.default_uid);
        out.field("default_gid").number(bounds.default_gid);
        out.close('}');
        out.close('}');
        out.close('}');
        out.text
    }
}

/// A JSON writer just big enough for the report: no serializer library (serde_json needs
/// serde's `std` or `alloc`, and features unify with the no_std agent's build).
#[derive(Default)]
pub(crate) struct Json {
    /// The document so far.
    pub(crate) text: String,
    /// Whether the innermost open container has an element yet.
    nonempty: Vec<bool>,
}

impl Json {
    pub(crate) fn open(&mut self, bracket: char) -> &mut Self {
        self.text.push(bracket);
        self.nonempty.push(false);
        self
    }

    pub(crate) fn close(&mut self, bracket: char) {
        self.nonempty.pop();
        self.text.push(bracket);
    }

    /// A comma when needed.
    pub(crate) fn item(&mut self) -> &mut Self {
        if let Some(nonempty) = self.nonempty.last_mut() {
            if *nonempty {
                self.text.push(',');
            }
            *nonempty = true;
        }
        self
    }

    pub(crate) fn field(&mut self, name: &str) -> &mut Self {
        self.item().string(name);
        self.text.push(':');
        self
    }

    pub(crate) fn raw(&mut self, text: &str) {
        self.text.push_str(text);
    }

    pub(crate) fn number(&mut self, value: impl Into<u64>) {
        let _ = write!(self.text, "{}", value.into());
    }

    pub(crate) fn boolean(&mut self, value: bool) {
        self.raw(if value { "true" } else { "false" });
    }

    pub(crate) fn null(&mut self) {
        self.raw("null");
    }

    /// Milliseconds as seconds with three decimals.
    pub(crate) fn millis(&mut self, ms: i64) {
        let sign = if ms < 0 { "-" } else { "" };
        let ms = ms.unsigned_abs();
        let _ = write!(self.text, "{sign}{}.{:03}", ms / 1000, ms % 1000);
    }

    pub(crate) fn string(&mut self, value: &str) {
        self.text.push('"');
        for c in value.chars() {
            match c {
                '"' => self.text.push_str("\\\""),
                '\\' => self.text.push_str("\\\\"),
                '\n' => self.text.push_str("\\n"),
                '\r' => self.text.push_str("\\r"),
                '\t' => self.text.push_str("\\t"),
                c if u32::from(c) < 0x20 => {
                    let _ = write!(self.text, "\\u{:04x}", u32::from(c));
                }
                c => self.text.push(c),
            }
        }
        self.text.push('"');
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds:
/// `2026-11-26T00:42:39.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(978_307_200_000), "2001-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_790_000_000_123), "2026-09-21T14:13:20.123Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn json_escapes_and_separates() {
        let mut out = Json::default();
        out.open('{');
        out.field("a\"b").string("x\\y\n\u{1}é");
        out.field("list").open('[');
        out.item().number(1u32);
        out.item().millis(-1500);
        out.close(']');
        out.field("empty").open('[');
        out.close(']');
        out.close('}');
        assert_eq!(
            out.text,
            r#"{"a\"b":"x\\y\n\u0001é","list":[1,-1.500],"empty":[]}"#
        );
    }

    #[test]
    fn clock_steps() {
        let step = ClockStep {
            previous: to_system_time(Timestamp {
                secs: 978_307_203,
                nanos: 0,
            }),
            set_to: to_system_time(Timestamp {
                secs: 978_307_203 + 86_400,
                nanos: 500_000_000,
            }),
        };
        assert_eq!(step.step_seconds(), 86_400.5);
        let back = ClockStep {
            previous: step.set_to,
            set_to: step.previous,
        };
        assert_eq!(back.step_seconds(), -86_400.5);
    }
}
