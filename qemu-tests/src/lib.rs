//! Fixtures for the QEMU scenario tests: the booted guest's address and ways to look inside it.
//!
//! The guest is booted once per run by `cargo xtask e2e`, which hands its address to the test
//! binary in `FERRY_CONNECT`; every test in the binary shares that one boot.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_host::{Client, Command, ConnectOptions, Target};

/// The guest's address, from `FERRY_CONNECT`.
pub fn target() -> Result<Target> {
    let text = std::env::var("FERRY_CONNECT").context(
        "FERRY_CONNECT is not set: the QEMU scenarios need a booted guest; run them with `cargo xtask e2e`",
    )?;
    text.parse()
        .with_context(|| format!("FERRY_CONNECT={text} is not a ferry target"))
}

/// A client for the shared guest. Connecting is lazy: each exec opens its own connection.
pub fn client() -> Result<Client> {
    Ok(Client::new(&target()?, ConnectOptions::default()))
}

/// `/bin/sh -c SCRIPT` (busybox in the full image).
pub fn sh(script: &str) -> Command {
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(script);
    command
}

/// Bytes of every value, NUL and invalid UTF-8 included, in a sequence that exposes reordering.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8).collect()
}

/// One guest process, as `/proc/PID/stat` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestProcess {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    pub pgid: u32,
}

/// Parses one `/proc/PID/stat` line. The command name may hold spaces and parentheses, so the
/// fields after it are found from the last `)`.
pub fn parse_stat(line: &str) -> Option<GuestProcess> {
    let open = line.find(" (")?;
    let close = line.rfind(')')?;
    let pid = line[..open].trim().parse().ok()?;
    let comm = line.get(open + 2..close)?.to_owned();
    let mut rest = line.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgid = rest.next()?.parse().ok()?;
    Some(GuestProcess {
        pid,
        comm,
        state,
        ppid,
        pgid,
    })
}

/// Every process in the guest, by pid, read through an exec of busybox `cat` (which itself shows
/// up in the list).
pub fn guest_processes(client: &Client) -> Result<BTreeMap<u32, GuestProcess>> {
    // Processes may exit between the glob and the read: those errors are expected and ignored.
    let output = client.output(&sh("cat /proc/[0-9]*/stat 2>/dev/null; true"))?;
    if !output.success() {
        bail!("listing guest processes: {:?}", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut processes = BTreeMap::new();
    for line in text.lines() {
        let process =
            parse_stat(line).with_context(|| format!("unparsable /proc stat line {line:?}"))?;
        processes.insert(process.pid, process);
    }
    Ok(processes)
}

/// Waits until no guest process (zombies included) is left in process group `pgid`.
pub fn wait_guest_group_gone(client: &Client, pgid: u32, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<GuestProcess> = guest_processes(client)?
            .into_values()
            .filter(|p| p.pgid == pgid)
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("processes left in guest group {pgid} after {within:?}: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A field (in KiB) of a guest process's `/proc/PID/status`, such as `VmHWM`.
pub fn guest_status_kib(client: &Client, pid: u32, field: &str) -> Result<u64> {
    let output = client.output(Command::new("cat").arg(format!("/proc/{pid}/status")))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            value.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_awkward_names_parse() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100";
        assert_eq!(
            parse_stat(line),
            Some(GuestProcess {
                pid: 42,
                comm: "a (b) c".into(),
                state: 'S',
                ppid: 1,
                pgid: 42,
            })
        );
        assert_eq!(parse_stat("1 (init) Z 0"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_missing_target_says_how_to_run() {
        if std::env::var_os("FERRY_CONNECT").is_none() {
            let err = target().expect_err("unset");
            assert!(format!("{err:#}").contains("cargo xtask e2e"), "{err:#}");
        }
    }
}
