//! Info, shutdown, time sync and reseed against the shipped agent on a Unix socket (service
//! mode, on this machine: its report must agree with our own /proc). A shutdown here only ever
//! runs a stub `power_command`; the clock is never set (it is this machine's).
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::json::{parse, Json};
use common::{fresh_dir, Agent};
use ferry_host::{Client, ConnectOptions, Error, ErrorCode};

fn ferry(agent: &Agent) -> Command {
    let mut command = common::ferry(agent);
    command.stdin(Stdio::null());
    command
}

fn meminfo_kib(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn info_json_agrees_with_this_machine() {
    let agent = Agent::start();
    let output = ferry(&agent).args(["info", "--json"]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let json = parse(std::str::from_utf8(&output.stdout).unwrap());
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(json.get("hostname").text(), hostname.trim());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(json.get("kernel_release").text(), release.trim());
    assert_eq!(json.get("machine").text(), std::env::consts::ARCH);
    assert_eq!(
        json.get("memory_total").num() as u64,
        meminfo_kib("MemTotal:") * 1024
    );
    let available = json.get("memory_available").num();
    assert!(available > 0.0 && available <= json.get("memory_total").num());
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(json.get("cpus").num() as usize, cpus);
    // Uptime and boot time: the kernel's own, within a second or two.
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((json.get("uptime_s").num() - uptime).abs() < 2.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((json.get("clock_s").num() - now).abs() < 2.0);
    assert!((json.get("boot_time_s").num() - (now - uptime)).abs() < 2.0);
    let boot_time = json.get("boot_time").text();
    assert!(
        boot_time.ends_with('Z') && boot_time.len() == 24,
        "{boot_time}"
    );
    assert_eq!(json.get("load").list().len(), 3);
    assert!(json.get("processes").num() >= 1.0);
    // The root file system, with statvfs's numbers (free space moves a little meanwhile).
    let mounts = json.get("mounts").list();
    let root = mounts
        .iter()
        .find(|m| m.get("target").text() == "/")
        .expect("/ among the mounts");
    let stat = statvfs("/");
    assert_eq!(root.get("total").num() as u64, stat.0);
    assert!((root.get("available").num() - stat.1 as f64).abs() < 256.0 * 1024.0 * 1024.0);
    assert!(!root.get("fstype").text().is_empty());
    assert!(mounts
        .iter()
        .any(|m| m.get("target").text() == "/proc" && m.get("fstype").text() == "proc"));
    // Loopback: up, its address, 00:00:00:00:00:00.
    let interfaces = json.get("interfaces").list();
    let lo = interfaces
        .iter()
        .find(|i| i.get("name").text() == "lo")
        .expect("lo among the interfaces");
    assert_eq!(lo.get("up"), &Json::Bool(true));
    assert_eq!(lo.get("mac").text(), "00:00:00:00:00:00");
    let addresses: Vec<&str> = lo.get("addresses").list().iter().map(Json::text).collect();
    assert_eq!(addresses, ["127.0.0.1/8"]);
    assert!(lo.get("mtu").num() > 0.0);
    for interface in interfaces {
        let name = interface.get("name").text();
        let sys_mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).unwrap();
        assert_eq!(
            interface.get("mtu").num() as u64,
            sys_mtu.trim().parse::<u64>().unwrap()
        );
    }
    // The agent: this test's child, as a service.
    let me = json.get("agent");
    assert_eq!(me.get("pid").num() as u32, agent.pid());
    assert_eq!(me.get("mode").text(), "service");
    assert_eq!(me.get("security").text(), "authenticated");
    let rss = me.get("rss").num();
    assert!(rss > 0.0 && rss < 16.0 * 1024.0 * 1024.0, "{rss}");
    assert!(me.get("protocol").num() >= 4.0);
    assert!(me.get("limits").get("max_frame_body").num() > 0.0);
    assert!(me.get("bounds").get("max_connections").num() > 0.0);
    // And the summary.
    let output = ferry(&agent).arg("info").output().unwrap();
    assert!(output.status.success());
    let summary = String::from_utf8(output.stdout).unwrap();
    assert!(
        summary.contains(&format!("hostname:   {}", hostname.trim())),
        "{summary}"
    );
}

/// (total, available) bytes of the file system at `path`, by `stat -f`.
fn statvfs(path: &str) -> (u64, u64) {
    let output = Command::new("stat")
        .args(["-f", "-c", "%S %b %a", path])
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let numbers: Vec<u64> = text
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    (numbers[0] * numbers[1], numbers[0] * numbers[2])
}

#[test]
fn info_through_the_library() {
    let agent = Agent::start();
    let report = agent.client().info().unwrap();
    assert!(!report.kernel_release.is_empty());
    assert!(report.mounts.len() + report.interfaces.len() <= 256);
    assert_eq!(report.agent.pid, agent.pid());
    let json = parse(&report.to_json());
    assert_eq!(json.get("hostname").text(), report.hostname);
}

/// A stub power command: writes its arguments to `DIR/called`.
fn stub_power_command() -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = fresh_dir("ferry-power");
    let script = dir.join("power");
    let called = dir.join("called");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", called.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, called)
}

fn wait_for_file(path: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.is_empty() {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_service_agent_asks_its_power_command_and_keeps_serving() {
    let (script, called) = stub_power_command();
    let setting = format!("power_command={}", script.display());
    let agent = Agent::start_with(&["--set", &setting]);
    let output = ferry(&agent)
        .args(["shutdown", "--grace", "1s"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(wait_for_file(&called), "poweroff\n");
    std::fs::remove_file(&called).unwrap();
    agent.client().shutdown(true, Duration::ZERO).unwrap();
    assert_eq!(wait_for_file(&called), "reboot\n");
    // The service goes on: the system's init stops it when it powers off.
    agent.client().health().unwrap();
}

fn refused_code(result: Result<impl std::fmt::Debug, Error>) -> ErrorCode {
    match result {
        Err(Error::Remote(remote)) => remote.code,
        other => panic!("not refused by the agent: {other:?}"),
    }
}

#[test]
fn an_insecure_agent_refuses_privileged_operations_unless_allowed() {
    let (script, called) = stub_power_command();
    let setting = format!("power_command={}", script.display());
    let agent = Agent::start_with(&["--insecure", "--set", &setting]);
    let client = Client::new(&agent.target(), ConnectOptions::default());
    assert_eq!(
        refused_code(client.shutdown(false, Duration::ZERO)),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        refused_code(client.time_sync()),
        ErrorCode::PermissionDenied
    );
    assert_eq!(refused_code(client.reseed(16)), ErrorCode::PermissionDenied);
    // Info is for anyone who may connect.
    client.info().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!called.exists(), "a refused shutdown ran the power command");

    // The key says so.
    let agent = Agent::start_with(&[
        "--insecure",
        "--set",
        &setting,
        "--set",
        "allow_shutdown=true",
    ]);
    let client = Client::new(&agent.target(), ConnectOptions::default());
    client.shutdown(false, Duration::ZERO).unwrap();
    assert_eq!(wait_for_file(&called), "poweroff\n");
}

#[test]
fn allow_shutdown_false_refuses_authenticated_clients_too() {
    let (script, called) = stub_power_command();
    let setting = format!("power_command={}", script.display());
    let agent = Agent::start_with(&["--set", &setting, "--set", "allow_shutdown=false"]);
    let client = agent.client();
    assert_eq!(
        refused_code(client.shutdown(true, Duration::from_secs(1))),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        refused_code(client.time_sync()),
        ErrorCode::PermissionDenied
    );
    assert_eq!(refused_code(client.reseed(1)), ErrorCode::PermissionDenied);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!called.exists());
}

#[test]
fn reseed_adds_to_the_pool_as_root_and_is_refused_otherwise() {
    let agent = Agent::start();
    let client = agent.client();
    let is_root = unsafe_free_euid() == 0;
    match client.reseed(64) {
        Ok(count) => {
            assert!(is_root);
            assert_eq!(count, 64);
        }
        Err(err) => {
            assert!(!is_root, "{err}");
            assert_eq!(refused_code(Err::<(), _>(err)), ErrorCode::PermissionDenied);
        }
    }
    // Sizes outside 1..=512 never leave the host.
    assert!(matches!(client.reseed(0), Err(Error::InvalidRequest(_))));
    assert!(matches!(client.reseed(513), Err(Error::InvalidRequest(_))));
    assert!(matches!(
        client.shutdown(false, Duration::from_secs(601)),
        Err(Error::InvalidRequest(_))
    ));
    let output = ferry(&agent)
        .args(["reseed", "--bytes", "513"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(255));
    // The agent is unharmed.
    client.health().unwrap();
}

fn unsafe_free_euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}
