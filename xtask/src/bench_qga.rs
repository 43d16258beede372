//! `cargo xtask bench --peers`: a qemu-guest-agent client, driven the way its users drive it
//! (libvirt's `virsh qemu-agent-command`, Proxmox, scripts): QMP-style JSON requests on the agent's
//! socket, one line each; `guest-exec` with `capture-output` and `guest-exec-status` polled until
//! `exited`; uploads through `guest-file-open`/`guest-file-write` (base64)/`guest-file-close`.
//!
//! A small JSON reader of its own: the answers are a handful of shapes, and serde_json would bring
//! serde's `std` feature into the workspace, which feature unification hands to the no_std agent.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A JSON value, as far as qemu-ga's answers need.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

/// Nesting deeper than this is refused (qemu-ga's answers nest three levels).
const MAX_DEPTH: usize = 64;

impl Json {
    pub fn parse(text: &str) -> Result<Json> {
        let mut parser = Parser {
            bytes: text.as_bytes(),
            at: 0,
        };
        let value = parser.value(0)?;
        parser.skip_ws();
        if parser.at != parser.bytes.len() {
            bail!("trailing bytes after JSON at offset {}", parser.at);
        }
        Ok(value)
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) if *n >= 0.0 && n.fract() == 0.0 && *n < 2f64.powi(53) => {
                Some(*n as u64)
            }
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Number(n) if n.fract() == 0.0 && n.abs() < 2f64.powi(53) => Some(*n as i64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Result<()> {
        if self.peek() != Some(byte) {
            bail!("expected {:?} at offset {}", byte as char, self.at);
        }
        self.at += 1;
        Ok(())
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json> {
        if !self.bytes[self.at..].starts_with(word.as_bytes()) {
            bail!("bad literal at offset {}", self.at);
        }
        self.at += word.len();
        Ok(value)
    }

    fn value(&mut self, depth: usize) -> Result<Json> {
        if depth > MAX_DEPTH {
            bail!("JSON nested deeper than {MAX_DEPTH}");
        }
        self.skip_ws();
        match self.peek() {
            Some(b'{') => {
                self.at += 1;
                let mut fields = Vec::new();
                self.skip_ws();
                if self.peek() == Some(b'}') {
                    self.at += 1;
                    return Ok(Json::Object(fields));
                }
                loop {
                    self.skip_ws();
                    let key = self.string()?;
                    self.skip_ws();
                    self.expect(b':')?;
                    let value = self.value(depth + 1)?;
                    fields.push((key, value));
                    self.skip_ws();
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            return Ok(Json::Object(fields));
                        }
                        _ => bail!("expected ',' or '}}' at offset {}", self.at),
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                self.skip_ws();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.skip_ws();
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => bail!("expected ',' or ']' at offset {}", self.at),
                    }
                }
            }
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.at;
                while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.peek() {
                    self.at += 1;
                }
                let text = std::str::from_utf8(&self.bytes[start..self.at])?;
                Ok(Json::Number(
                    text.parse()
                        .with_context(|| format!("bad number {text:?}"))?,
                ))
            }
            Some(other) => bail!("unexpected {:?} at offset {}", other as char, self.at),
            None => bail!("JSON ends early"),
        }
    }

    fn string(&mut self) -> Result<String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            // The long base64 payloads have no escapes: copy runs of plain bytes at once.
            let run = self.bytes[self.at..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\')
                .context("unterminated JSON string")?;
            out.extend_from_slice(&self.bytes[self.at..self.at + run]);
            self.at += run;
            if self.bytes[self.at] == b'"' {
                self.at += 1;
                return String::from_utf8(out).context("JSON string is not UTF-8");
            }
            self.at += 1;
            let escaped = self.peek().context("JSON string ends in an escape")?;
            self.at += 1;
            match escaped {
                b'"' | b'\\' | b'/' => out.push(escaped),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'u' => {
                    let hex = self
                        .bytes
                        .get(self.at..self.at + 4)
                        .context("short \\u escape")?;
                    let code = u32::from_str_radix(std::str::from_utf8(hex)?, 16)?;
                    self.at += 4;
                    // Surrogate pairs never occur in these answers; a lone one becomes U+FFFD.
                    let c = char::from_u32(code).unwrap_or('\u{fffd}');
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
                other => bail!("bad escape \\{}", other as char),
            }
        }
    }
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How many bytes a base64 text decodes to (its padding subtracted).
pub fn base64_decoded_len(text: &str) -> u64 {
    let padding = text.bytes().rev().take_while(|&b| b == b'=').count() as u64;
    (text.len() as u64 / 4 * 3).saturating_sub(padding)
}

/// A connection to a qemu-ga listening on a Unix socket (`-m unix-listen`).
pub struct QgaClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

/// What `guest-exec-status` said once the command had exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecStatus {
    pub exitcode: Option<i64>,
    /// Decoded length of `out-data`.
    pub out_bytes: u64,
    pub out_truncated: bool,
}

impl ExecStatus {
    /// From a `guest-exec-status` answer's `return` object: `None` while it runs.
    pub fn from_return(ret: &Json) -> Result<Option<ExecStatus>> {
        let exited = ret
            .get("exited")
            .and_then(Json::as_bool)
            .context("guest-exec-status without `exited`")?;
        if !exited {
            return Ok(None);
        }
        Ok(Some(ExecStatus {
            exitcode: ret.get("exitcode").and_then(Json::as_i64),
            out_bytes: ret
                .get("out-data")
                .and_then(Json::as_str)
                .map_or(0, base64_decoded_len),
            out_truncated: ret
                .get("out-truncated")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        }))
    }
}

/// An answer's `return` value, or its `error` as an error.
pub fn answer_return(answer: Json) -> Result<Json> {
    if let Some(error) = answer.get("error") {
        let class = error.get("class").and_then(Json::as_str).unwrap_or("?");
        let desc = error.get("desc").and_then(Json::as_str).unwrap_or("?");
        bail!("qemu-ga: {class}: {desc}");
    }
    match answer {
        Json::Object(fields) => fields
            .into_iter()
            .find(|(k, _)| k == "return")
            .map(|(_, v)| v)
            .context("qemu-ga answer without `return`"),
        other => bail!("qemu-ga answer is not an object: {other:?}"),
    }
}

impl QgaClient {
    /// Connects (waiting up to `timeout` for the socket) and synchronizes with `guest-sync`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<QgaClient> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(err) if Instant::now() < deadline => {
                    let _ = err;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(err) => {
                    return Err(err).with_context(|| format!("connecting to {}", socket.display()))
                }
            }
        };
        let mut client = QgaClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            line: String::new(),
        };
        let id = u64::from(std::process::id()) * 1000 + 7;
        let synced = client.call(&format!(
            r#"{{"execute":"guest-sync","arguments":{{"id":{id}}}}}"#
        ))?;
        if synced.as_u64() != Some(id) {
            bail!("guest-sync answered {synced:?}, not {id}");
        }
        Ok(client)
    }

    /// One request, one answer line: its `return` value.
    pub fn call(&mut self, request: &str) -> Result<Json> {
        self.writer.write_all(request.as_bytes())?;
        self.writer.write_all(b"\n")?;
        self.line.clear();
        if self.reader.read_line(&mut self.line)? == 0 {
            bail!("qemu-ga closed the connection");
        }
        answer_return(Json::parse(self.line.trim_end())?)
    }

    /// `guest-exec` of `path args` with its output captured: the pid.
    pub fn exec(&mut self, path: &str, args: &[&str]) -> Result<u64> {
        let args = args
            .iter()
            .map(|a| format!("\"{}\"", json_escape(a)))
            .collect::<Vec<_>>()
            .join(",");
        let ret = self.call(&format!(
            r#"{{"execute":"guest-exec","arguments":{{"path":"{}","arg":[{args}],"capture-output":true}}}}"#,
            json_escape(path)
        ))?;
        ret.get("pid")
            .and_then(Json::as_u64)
            .context("guest-exec answered without a pid")
    }

    /// Polls `guest-exec-status` until the command exited, sleeping `interval` between polls
    /// (zero: back to back, qemu-ga's best case).
    pub fn wait(&mut self, pid: u64, interval: Duration) -> Result<ExecStatus> {
        loop {
            if crate::vm::interrupted() {
                bail!("interrupted");
            }
            let ret = self.call(&format!(
                r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#
            ))?;
            if let Some(status) = ExecStatus::from_return(&ret)? {
                return Ok(status);
            }
            if !interval.is_zero() {
                std::thread::sleep(interval);
            }
        }
    }

    /// `total` bytes of `pattern` (repeated) written to `path` in `chunk`-sized base64 writes.
    pub fn upload(&mut self, path: &str, pattern: &[u8], chunk: usize, total: u64) -> Result<()> {
        let handle = self
            .call(&format!(
                r#"{{"execute":"guest-file-open","arguments":{{"path":"{}","mode":"w"}}}}"#,
                json_escape(path)
            ))?
            .as_u64()
            .context("guest-file-open answered without a handle")?;
        // Every full chunk is the same bytes: encode once (the client's share is then nil).
        let full = &pattern[..chunk.min(pattern.len())];
        let full_request = format!(
            r#"{{"execute":"guest-file-write","arguments":{{"handle":{handle},"buf-b64":"{}"}}}}"#,
            base64(full)
        );
        let mut left = total;
        let result = (|| {
            while left > 0 {
                let n = left.min(full.len() as u64) as usize;
                let ret = if n == full.len() {
                    self.call(&full_request)?
                } else {
                    self.call(&format!(
                        r#"{{"execute":"guest-file-write","arguments":{{"handle":{handle},"buf-b64":"{}"}}}}"#,
                        base64(&full[..n])
                    ))?
                };
                let count = ret.get("count").and_then(Json::as_u64);
                if count != Some(n as u64) {
                    bail!("guest-file-write wrote {count:?} of {n} bytes");
                }
                left -= n as u64;
            }
            Ok(())
        })();
        let closed = self.call(&format!(
            r#"{{"execute":"guest-file-close","arguments":{{"handle":{handle}}}}}"#
        ));
        result?;
        closed?;
        Ok(())
    }
}

fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_ga_answers_parse() {
        let pid = answer_return(Json::parse(r#"{"return": {"pid": 4242}}"#).unwrap()).unwrap();
        assert_eq!(pid.get("pid").and_then(Json::as_u64), Some(4242));

        let running = Json::parse(r#"{"exited": false}"#).unwrap();
        assert_eq!(ExecStatus::from_return(&running).unwrap(), None);

        let done = answer_return(
            Json::parse(
                r#"{"return": {"exitcode": 0, "out-data": "AAAAAA==", "exited": true, "out-truncated": true}}"#,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            ExecStatus::from_return(&done).unwrap(),
            Some(ExecStatus {
                exitcode: Some(0),
                out_bytes: 4,
                out_truncated: true
            })
        );
        // Killed by a signal: no exitcode, a `signal` instead.
        let killed = Json::parse(r#"{"exited": true, "signal": 9}"#).unwrap();
        assert_eq!(
            ExecStatus::from_return(&killed).unwrap().unwrap().exitcode,
            None
        );
        assert!(ExecStatus::from_return(&Json::parse("{}").unwrap()).is_err());

        let error = Json::parse(
            r#"{"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}}"#,
        )
        .unwrap();
        let message = answer_return(error).unwrap_err().to_string();
        assert!(message.contains("Invalid parameter 'pid'"), "{message}");
        assert_eq!(
            answer_return(Json::parse(r#"{"return": 1000}"#).unwrap())
                .unwrap()
                .as_u64(),
            Some(1000)
        );
    }

    #[test]
    fn json_edges() {
        assert_eq!(
            Json::parse(r#" {"a": [1, -2.5e1, true, null, "x\"\\\n\u00e9"], "b": {}} "#).unwrap(),
            Json::Object(vec![
                (
                    "a".into(),
                    Json::Array(vec![
                        Json::Number(1.0),
                        Json::Number(-25.0),
                        Json::Bool(true),
                        Json::Null,
                        Json::String("x\"\\\né".into()),
                    ])
                ),
                ("b".into(), Json::Object(vec![])),
            ])
        );
        for bad in [
            "",
            "{",
            r#"{"a" 1}"#,
            r#"{"a": 1,}"#,
            "[1 2]",
            r#""open"#,
            "tru",
            "{} x",
            r#""\q""#,
            r#""\u12""#,
        ] {
            assert!(Json::parse(bad).is_err(), "{bad:?} parsed");
        }
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert!(Json::parse(&deep).is_err());
        assert_eq!(Json::Number(-1.0).as_u64(), None);
        assert_eq!(Json::Number(1.5).as_u64(), None);
    }

    #[test]
    fn base64_round_numbers() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00, 0x01]), "//4AAQ==");
        for n in 0..10 {
            assert_eq!(base64_decoded_len(&base64(&vec![7; n])), n as u64);
        }
        assert_eq!(json_escape("a\"b\\c\n"), "a\\\"b\\\\c\\u000a");
    }
}
