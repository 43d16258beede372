//! `ferry exec --detach`, `jobs`, `wait`, `kill`, `attach` and `rm`: detached jobs.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use ferry_host::{
    job_state_name, jobs_to_json, AttachOptions, Client, Command, ExitStatus, JobHandle, JobInfo,
    JobState,
};

use crate::{fail, report_end, start_failure, Run};

#[derive(clap::Args)]
pub struct JobsArgs {
    /// Print the stable JSON document (field names in docs/cli.md) instead of a table
    #[arg(long)]
    json: bool,

    /// List as this guest user (NAME[:GROUP] or UID[:GID]): a user sees its own jobs (root
    /// sees all, and everyone where the agent's policy says jobs_any_user)
    #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
    user: Option<OsString>,
}

#[derive(clap::Args)]
pub struct JobArgs {
    /// The job: its id or its name
    #[arg(value_name = "ID")]
    job: String,

    /// Act as this guest user (NAME[:GROUP] or UID[:GID]); a job belongs to the user it runs as
    #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
    user: Option<OsString>,
}

#[derive(clap::Args)]
pub struct KillArgs {
    #[command(flatten)]
    job: JobArgs,

    /// Send this one signal (TERM, SIGUSR1, 9, …) to every process of the job's tree instead of
    /// ending it
    #[arg(short = 's', long, value_name = "SIG", value_parser = parse_signal, conflicts_with = "grace")]
    signal: Option<i32>,

    /// The time between the tree's SIGTERM and its SIGKILL (default: the job's --kill-after,
    /// else the agent's 2s; 0: SIGKILL at once)
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_kill_after, allow_hyphen_values = true)]
    grace: Option<Duration>,
}

#[derive(clap::Args)]
pub struct AttachArgs {
    #[command(flatten)]
    job: JobArgs,

    /// Start both streams at this byte offset (what `ferry jobs` counts; 0, the default, is
    /// from the start); bytes the agent no longer holds are reported on stderr
    #[arg(long, value_name = "OFFSET", conflicts_with_all = ["since_stdout", "since_stderr"])]
    since: Option<u64>,

    /// Start stdout at this byte offset
    #[arg(long, value_name = "N")]
    since_stdout: Option<u64>,

    /// Start stderr at this byte offset
    #[arg(long, value_name = "N")]
    since_stderr: Option<u64>,

    /// Print what the agent holds and exit (0 while the job runs, its status once it ended)
    /// instead of following the job to its end
    #[arg(long, conflicts_with = "follow")]
    no_follow: bool,

    /// Follow the job to its end (the default; the flag says it explicitly)
    #[arg(short = 'f', long)]
    follow: bool,

    /// Forward this process's stdin to the job (one attachment at a time may; the job must have
    /// been started with -i)
    #[arg(short = 'i', long = "stdin")]
    interactive: bool,
}

impl JobArgs {
    fn handle(&self, client: &Client) -> JobHandle {
        let job = client.job(self.job.as_str());
        match &self.user {
            Some(user) => job.user(user),
            None => job,
        }
    }
}

/// `exec --detach`: one line on stdout, the job's id, once it started.
pub fn detach(
    client: &Client,
    command: &Command,
    program: &OsString,
    name: Option<&str>,
) -> ExitCode {
    match client.start_job(command, name) {
        Ok(started) => {
            println!("{}", started.id);
            ExitCode::SUCCESS
        }
        Err(err) => start_failure(program, &err),
    }
}

pub fn list(client: &Client, args: JobsArgs) -> ExitCode {
    let jobs = match client.jobs(args.user.as_deref()) {
        Ok(jobs) => jobs,
        Err(err) => return fail(&err),
    };
    if args.json {
        println!("{}", jobs_to_json(&jobs));
    } else {
        print!("{}", table(&jobs));
    }
    ExitCode::SUCCESS
}

pub fn wait(client: &Client, args: JobArgs) -> ExitCode {
    match args.handle(client).wait() {
        Ok(end) => report_end(&end, None),
        Err(err) => fail(&format_args!("job {}: {err}", args.job)),
    }
}

pub fn kill(client: &Client, args: KillArgs) -> ExitCode {
    match args.job.handle(client).kill(args.signal, args.grace) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&format_args!("job {}: {err}", args.job.job)),
    }
}

pub fn remove(client: &Client, args: JobArgs) -> ExitCode {
    match args.handle(client).remove() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&format_args!("job {}: {err}", args.job)),
    }
}

pub fn attach(client: &Client, args: AttachArgs) -> ExitCode {
    let since = args.since.unwrap_or(0);
    let options = AttachOptions {
        since_stdout: args.since_stdout.unwrap_or(since),
        since_stderr: args.since_stderr.unwrap_or(since),
        follow: !args.no_follow,
        stdin: args.interactive,
    };
    let attachment = match args.job.handle(client).attach(options) {
        Ok(attachment) => attachment,
        Err(err) => return fail(&format_args!("job {}: {err}", args.job.job)),
    };
    let granted = attachment.header().stdin;
    if args.interactive && !granted {
        eprintln!(
            "ferry: job {}: its stdin is not ours (another attachment holds it, it was closed, \
             or the job was started without -i); attached without it",
            args.job.job
        );
    }
    let run = Run {
        program: OsString::from(&args.job.job),
        interactive: granted,
        tty: false,
        timeout: None,
        job_name: None,
        user: args.job.user.clone(),
        forward_signals: false,
        attached: true,
    };
    run.follow(attachment)
}

/// `--signal`: a name (`TERM`, `SIGTERM`, `term`) or a number (1–64).
fn parse_signal(text: &str) -> Result<i32, String> {
    if let Ok(number) = text.parse::<i32>() {
        return match number {
            1..=64 => Ok(number),
            _ => Err(format!("no such signal: {number} (1 to 64)")),
        };
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, number)| *number)
        .ok_or_else(|| format!("no such signal: {text:?}"))
}

/// Linux's signal numbers (x86_64 and aarch64 agree on these).
const SIGNALS: [(&str, i32); 19] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("WINCH", 28),
];

fn signal_name(number: u8) -> String {
    SIGNALS
        .iter()
        .find(|(_, known)| *known == i32::from(number))
        .map_or_else(
            || format!("signal {number}"),
            |(name, _)| format!("SIG{name}"),
        )
}

/// `ferry jobs`: a header and one line per job, columns aligned.
fn table(jobs: &[JobInfo]) -> String {
    let header = [
        "ID", "NAME", "USER", "STATE", "STARTED", "DURATION", "BYTES", "EXIT", "COMMAND",
    ];
    let mut rows: Vec<[String; 9]> = vec![header.map(str::to_owned)];
    for job in jobs {
        rows.push([
            job.id.to_string(),
            job.name.clone().unwrap_or_else(|| "-".into()),
            format!("{}:{}", job.uid, job.gid),
            job_state_name(job.state).to_owned(),
            started(job.started_ms()),
            duration(job.duration),
            format!("{}/{}", size(job.stdout_bytes), size(job.stderr_bytes)),
            exit(job),
            job.command_line(),
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// UTC, to the second: `2026-11-26 00:42:39`.
fn started(ms: i64) -> String {
    let text = ferry_host::rfc3339(ms);
    text.get(..19).unwrap_or(&text).replacen('T', " ", 1)
}

/// `850ms`, `12.3s`, `4m05s`, `2h07m`, `3d04h`.
fn duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => format!("{}ms", duration.as_millis()),
        1..=59 => format!("{:.1}s", duration.as_secs_f64()),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// Bytes with a binary unit: `512`, `1.5K`, `12.0M`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// What the EXIT column says: the code, the signal, or `-` while it runs (`?` when lost).
fn exit(job: &JobInfo) -> String {
    match (&job.termination, job.state) {
        (Some(end), _) => match end.status {
            ExitStatus::Code(code) => code.to_string(),
            ExitStatus::Signal { number, .. } => signal_name(number),
        },
        (None, JobState::Running) => "-".into(),
        (None, _) => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("TERM"), Ok(15));
        assert_eq!(parse_signal("sigusr1"), Ok(10));
        assert_eq!(parse_signal("9"), Ok(9));
        assert_eq!(parse_signal("64"), Ok(64));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        assert!(parse_signal("-1").is_err());
        assert!(parse_signal("NOPE").is_err());
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(40), "signal 40");
    }

    #[test]
    fn table_cells() {
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(duration(Duration::from_secs(2 * 3600 + 7 * 60)), "2h07m");
        assert_eq!(
            duration(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d04h"
        );
        assert_eq!(size(512), "512");
        assert_eq!(size(1536), "1.5K");
        assert_eq!(size(12 * 1024 * 1024), "12.0M");
        assert_eq!(started(1_700_000_000_123), "2023-11-14 22:13:20");
    }

    #[test]
    fn the_table_aligns_its_columns() {
        let job = JobInfo {
            id: 7,
            name: None,
            argv: vec!["sleep".into(), "60".into()],
            uid: 0,
            gid: 0,
            pid: 99,
            state: JobState::Running,
            started: ferry_host::Timestamp {
                secs: 1_700_000_000,
                nanos: 123_000_000,
            },
            duration: Duration::from_secs(5),
            stdout_bytes: 0,
            stderr_bytes: 2048,
            termination: None,
        };
        let text = table(&[job]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("ID  NAME  USER  STATE    STARTED"),
            "{text}"
        );
        assert!(
            lines[1].starts_with(
                "7   -     0:0   running  2023-11-14 22:13:20  5.0s      0/2.0K  -     sleep 60"
            ),
            "{text}"
        );
    }
}
