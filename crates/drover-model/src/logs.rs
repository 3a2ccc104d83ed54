//! Logs, the flight recorder and exec on the wire: what the CLI asks the server, what the
//! server hands an agent over the agent's own connection (a task), what flows back (frames,
//! one JSON object per line), and the line format of the agent's rotated log files.

use serde::{Deserialize, Serialize};

use crate::fleet::LogConfig;

/// Default size at which a process component's log file is rotated.
pub const DEFAULT_MAX_SIZE: u64 = 10 << 20;
/// Default number of files kept per component (the current one and the rotated ones).
pub const DEFAULT_MAX_FILES: u32 = 3;
/// The smallest `max-size` accepted.
pub const MIN_MAX_SIZE: u64 = 64 << 10;
/// Longest line kept; a longer one is cut into pieces of this size.
pub const MAX_LINE: usize = 16 << 10;
/// How much of a component's output the flight recorder keeps when it dies (per component),
/// unless its `log.options.flight-size` says otherwise.
pub const FLIGHT_BYTES: usize = 64 << 10;
/// The log option that sets a component's flight recorder size (e.g. `"256k"`).
pub const FLIGHT_SIZE_OPTION: &str = "flight-size";
/// The smallest and the largest `flight-size`. The server keeps at most the largest of any
/// component (the agent cuts to the component's own).
pub const FLIGHT_BYTES_MIN: usize = 4 << 10;
pub const FLIGHT_BYTES_MAX: usize = 1 << 20;

/// A component's flight recorder size: its `log.options.flight-size`, else [`FLIGHT_BYTES`].
pub fn flight_bytes(log: Option<&LogConfig>) -> usize {
    log.and_then(|l| l.options.get(FLIGHT_SIZE_OPTION))
        .and_then(|s| crate::image::parse_memory(s))
        .map_or(FLIGHT_BYTES, |n| {
            (n as usize).clamp(FLIGHT_BYTES_MIN, FLIGHT_BYTES_MAX)
        })
}

/// Which of a component's outputs a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(&self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One line a component printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When the agent read it (ms since the epoch).
    pub at_ms: u64,
    pub instance: String,
    pub component: String,
    pub stream: Stream,
    /// The text, without its newline (`secret_env` values replaced by the server).
    pub line: String,
}

/// Work the server hands an agent over the agent's long-poll (`GET /v1/agent/tasks`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentTask {
    /// Send the output of the instance's components (one, or all).
    Logs {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        component: Option<String>,
        /// Only lines read at or after this time (ms since the epoch; 0: all kept).
        #[serde(default)]
        since_ms: u64,
        /// Only the last N lines (per component) of those.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail: Option<usize>,
        /// Then keep sending new lines until the server closes the upload.
        #[serde(default)]
        follow: bool,
    },
    /// Run a command in a component's environment (its container, for `docker`).
    Exec {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        component: Option<String>,
        command: Vec<String>,
        /// Give it a terminal (a pty; the engine's tty for a container).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        tty: bool,
        /// Give it the person's input: the agent reads it from
        /// `GET /v1/agent/tasks/ID/input`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stdin: bool,
        /// The terminal's size to begin with (with `tty`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<WinSize>,
    },
}

/// A terminal's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub cols: u16,
    pub rows: u16,
}

/// What a person sends an interactive exec (`POST /v1/exec/ID/input`, one JSON object a
/// line), and what the server hands its agent (`GET /v1/agent/tasks/ID/input`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecInput {
    /// Keys typed, or bytes of a file piped in.
    Data { data: String },
    /// The terminal's new size.
    Resize(WinSize),
    /// The input ended (the command's stdin is closed).
    Eof,
}

impl AgentTask {
    pub fn id(&self) -> u64 {
        match self {
            AgentTask::Logs { id, .. } | AgentTask::Exec { id, .. } => *id,
        }
    }
}

/// The answer to an agent's task long-poll.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TasksReply {
    pub tasks: Vec<AgentTask>,
}

/// One line of a task's upload (agent → server) and of the CLI's stream (server → CLI).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// A log line.
    Line(LogLine),
    /// Output of an exec'd command (a chunk, not necessarily whole lines).
    Output { stream: Stream, data: String },
    /// The exec'd command ended: its exit code (128 + N for a signal N).
    Exit {
        code: i32,
        /// How it ended, e.g. `exit status 1`.
        how: String,
    },
    /// What went wrong with this instance's part (the others go on).
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<String>,
        message: String,
    },
    /// Something the person should know (on stderr), e.g. that lines come from the flight
    /// recorder of an instance that is gone.
    Note { message: String },
    /// The session of an interactive exec (`stdin`): where its input goes,
    /// `POST /v1/exec/ID/input`. The server's first frame.
    Session { id: u64 },
    /// Nothing to say: sent by an agent once its history is sent (then every 10 s, which
    /// keeps an idle follow open and finds a person gone), and every 10 s of an exec
    /// session. A logs follow or an exec passes one on to the CLI when it sent nothing for
    /// 5 s (a keep-alive: readers skip it).
    Idle,
}

/// `GET /v1/logs`: whose output.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Only lines of the last this long, e.g. `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<crate::Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<usize>,
    #[serde(default)]
    pub follow: bool,
}

/// `POST /v1/exec`: what to run where.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Default: the service's first instance that is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Default: the plan's first component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    pub command: Vec<String>,
    /// A terminal for the command (`-t`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    /// The person's input for the command (`-i`): the answer's first frame is a `session`
    /// whose id `POST /v1/exec/ID/input` takes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// The terminal's size to begin with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<WinSize>,
}

/// What the flight recorder keeps of a component that died (`POST /v1/agent/flight`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlightRecord {
    pub instance: String,
    pub group: String,
    pub generation: u64,
    pub component: String,
    /// Why it was recorded, e.g. `exited: exit status 1`, `instance stopping`.
    pub reason: String,
    pub at_ms: u64,
    /// The last lines, oldest first, at most [`FLIGHT_BYTES`] of text.
    pub lines: Vec<LogLine>,
}

/// `POST /v1/agent/tail`: what the instance's components printed since the agent's last
/// batch, so that the server's copy of their tail (the flight recorder's) is current while the
/// agent runs and survives an agent killed without warning (SIGKILL, a machine lost).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailBatch {
    pub instance: String,
    pub group: String,
    pub generation: u64,
    pub components: Vec<TailPart>,
}

/// One component's new lines in a [`TailBatch`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailPart {
    pub component: String,
    /// The lines replace what the server kept of this component's tail (an agent's first
    /// batch, or one after lines were lost while the server was away); else they follow it.
    #[serde(default)]
    pub reset: bool,
    /// Oldest first, at most [`FLIGHT_BYTES`] of text.
    pub lines: Vec<LogLine>,
}

/// How often an agent sends the new lines of its components' tails (at most).
pub const TAIL_EVERY_MS: u64 = 1000;

/// The newest `limit` bytes of text of `lines` (counting each line's newline): the index of
/// the first line to keep.
pub fn flight_cut<T>(lines: &[T], limit: usize, text: impl Fn(&T) -> usize) -> usize {
    let mut total = 0usize;
    let mut keep = lines.len();
    for (k, l) in lines.iter().enumerate().rev() {
        total += text(l) + 1;
        if total > limit {
            break;
        }
        keep = k;
    }
    keep
}

/// A process component's rotation: (size at which the file is rotated, files kept).
pub fn rotation(log: Option<&LogConfig>) -> (u64, u32) {
    let opt = |k: &str| log.and_then(|l| l.options.get(k));
    let size = opt("max-size")
        .and_then(|s| crate::image::parse_memory(s))
        .unwrap_or(DEFAULT_MAX_SIZE)
        .max(MIN_MAX_SIZE);
    let files = opt("max-file")
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(DEFAULT_MAX_FILES)
        .clamp(1, 100);
    (size, files)
}

/// A line as the agent writes it to a component's log file: `2024-05-01T12:00:00.123Z out TEXT`.
pub fn format_line(at_ms: u64, stream: Stream, text: &str) -> String {
    let ts = chrono::DateTime::from_timestamp_millis(at_ms as i64)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ");
    let s = match stream {
        Stream::Stdout => "out",
        Stream::Stderr => "err",
    };
    format!("{ts} {s} {text}\n")
}

/// A line of a component's log file, as [`format_line`] wrote it (without the newline);
/// `None` for anything else.
pub fn parse_line(line: &str) -> Option<(u64, Stream, &str)> {
    let (ts, rest) = line.split_once(' ')?;
    let (s, text) = match rest.split_once(' ') {
        Some((s, t)) => (s, t),
        None => (rest, ""),
    };
    let stream = match s {
        "out" => Stream::Stdout,
        "err" => Stream::Stderr,
        _ => return None,
    };
    let at = chrono::DateTime::parse_from_rfc3339(ts).ok()?;
    Some((at.timestamp_millis().max(0) as u64, stream, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_components_flight_size_is_its_option_within_bounds() {
        let with = |v: &str| {
            let mut c = LogConfig::default();
            c.options.insert(FLIGHT_SIZE_OPTION.into(), v.into());
            flight_bytes(Some(&c))
        };
        assert_eq!(flight_bytes(None), FLIGHT_BYTES);
        assert_eq!(flight_bytes(Some(&LogConfig::default())), FLIGHT_BYTES);
        assert_eq!(with("256k"), 256 << 10);
        assert_eq!(with("1m"), FLIGHT_BYTES_MAX);
        assert_eq!(with("1g"), FLIGHT_BYTES_MAX);
        assert_eq!(with("1k"), FLIGHT_BYTES_MIN);
        let lines = ["aaa", "bbb", "ccc"];
        assert_eq!(flight_cut(&lines, 8, |l| l.len()), 1);
        assert_eq!(flight_cut(&lines, 100, |l| l.len()), 0);
    }

    #[test]
    fn lines_round_trip_and_rotation_has_defaults() {
        let l = format_line(1_700_000_000_123, Stream::Stderr, "boom: x y");
        assert_eq!(l, "2023-11-14T22:13:20.123Z err boom: x y\n");
        assert_eq!(
            parse_line(l.trim_end_matches('\n')),
            Some((1_700_000_000_123, Stream::Stderr, "boom: x y"))
        );
        assert_eq!(
            parse_line("2023-11-14T22:13:20.123Z out "),
            Some((1_700_000_000_123, Stream::Stdout, ""))
        );
        assert_eq!(parse_line("plain text from an older agent"), None);
        assert_eq!(rotation(None), (DEFAULT_MAX_SIZE, DEFAULT_MAX_FILES));
        let mut c = LogConfig::default();
        c.options.insert("max-size".into(), "64k".into());
        c.options.insert("max-file".into(), "2".into());
        assert_eq!(rotation(Some(&c)), (64 << 10, 2));
        let f = Frame::Exit {
            code: 1,
            how: "exit status 1".into(),
        };
        let s = serde_json::to_string(&f).unwrap();
        assert_eq!(s, r#"{"type":"exit","code":1,"how":"exit status 1"}"#);
        assert_eq!(serde_json::from_str::<Frame>(&s).unwrap(), f);
    }
}
