//! A process component's output on the instance: read from its stdout and stderr pipes, each
//! line timestamped (`drover_model::logs::format_line`) into `DIR/COMPONENT.log`, rotated by
//! size (`COMPONENT.log.1`, `.2`, ...; `max-size` × `max-file` bounds the disk it takes), and
//! read back for `drover logs` (since, tail, follow) and the flight recorder.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_model::logs::{format_line, parse_line, Stream, MAX_LINE};
use tokio::io::AsyncReadExt;

/// How often a follow looks for new lines.
pub(crate) const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The current log file of a component, rotated when it would grow past `max_size`.
pub(crate) struct LogFile {
    path: PathBuf,
    max_size: u64,
    max_files: u32,
    file: File,
    size: u64,
}

impl LogFile {
    pub fn open(path: &Path, (max_size, max_files): (u64, u32)) -> io::Result<LogFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_path_buf(),
            max_size,
            max_files: max_files.max(1),
            file,
            size,
        })
    }

    /// Append one line (without its newline), rotating first when it would not fit.
    pub fn write(&mut self, at_ms: u64, stream: Stream, text: &str) -> io::Result<()> {
        let line = format_line(at_ms, stream, text);
        if self.size > 0 && self.size + line.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let n = self.max_files;
        if n > 1 {
            let _ = std::fs::remove_file(rotated(&self.path, n - 1));
            for i in (1..n - 1).rev() {
                let _ = std::fs::rename(rotated(&self.path, i), rotated(&self.path, i + 1));
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        } else {
            self.file.set_len(0)?;
        }
        self.size = 0;
        Ok(())
    }
}

/// `COMPONENT.log.N`.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The files of a log, oldest first (the rotated ones that exist, then the current one).
pub(crate) fn files(path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = (1..=100)
        .map(|i| rotated(path, i))
        .take_while(|p| p.exists())
        .collect();
    out.reverse();
    out.push(path.to_path_buf());
    out
}

/// Splits a byte stream into lines (at most [`MAX_LINE`] bytes each).
#[derive(Default)]
struct Splitter {
    pending: Vec<u8>,
}

impl Splitter {
    fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        for &b in bytes {
            if b == b'\n' {
                out.push(take_line(&mut self.pending));
            } else {
                self.pending.push(b);
                if self.pending.len() >= MAX_LINE {
                    out.push(take_line(&mut self.pending));
                }
            }
        }
    }

    fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| take_line(&mut self.pending))
    }
}

fn take_line(buf: &mut Vec<u8>) -> String {
    let mut s = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    if s.ends_with('\r') {
        s.pop();
    }
    s
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Copy a process's stdout and stderr into its log until both are closed (the process and
/// whatever it started have exited). A write error is logged once; reading goes on (a full
/// disk must not block the component on a full pipe).
pub(crate) async fn capture(
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    mut log: LogFile,
) {
    let mut out = stdout;
    let mut err = stderr;
    let (mut so, mut se) = (Splitter::default(), Splitter::default());
    let (mut bo, mut be) = (vec![0u8; 8192], vec![0u8; 8192]);
    let mut warned = false;
    let mut lines = Vec::new();
    let mut write = |log: &mut LogFile, stream, lines: &mut Vec<String>| {
        let at = now_ms();
        for l in lines.drain(..) {
            if let Err(e) = log.write(at, stream, &l) {
                if !warned {
                    tracing::warn!(path = %log.path.display(), error = %e, "cannot write the component's log (lines are dropped until it can)");
                    warned = true;
                }
            }
        }
    };
    while out.is_some() || err.is_some() {
        tokio::select! {
            n = async { out.as_mut().unwrap().read(&mut bo).await }, if out.is_some() => match n {
                Ok(n) if n > 0 => {
                    so.push(&bo[..n], &mut lines);
                    write(&mut log, Stream::Stdout, &mut lines);
                }
                _ => {
                    lines.extend(so.finish());
                    write(&mut log, Stream::Stdout, &mut lines);
                    out = None;
                }
            },
            n = async { err.as_mut().unwrap().read(&mut be).await }, if err.is_some() => match n {
                Ok(n) if n > 0 => {
                    se.push(&be[..n], &mut lines);
                    write(&mut log, Stream::Stderr, &mut lines);
                }
                _ => {
                    lines.extend(se.finish());
                    write(&mut log, Stream::Stderr, &mut lines);
                    err = None;
                }
            },
        }
    }
}

/// One line read back: (ms, stream, text). A line not in drover's format (written by an
/// older agent) counts as stdout at time 0.
pub(crate) type Line = (u64, Stream, String);

fn parse(raw: &str) -> Line {
    match parse_line(raw) {
        Some((at, s, t)) => (at, s, t.to_string()),
        None => (0, Stream::Stdout, raw.to_string()),
    }
}

/// Where a follow goes on reading: the current file (by inode) and the offset read up to.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cursor {
    ino: u64,
    offset: u64,
}

/// The kept lines at or after `since_ms`, the last `tail` of them; and where a follow goes
/// on. Blocking: run it off the agent's thread.
pub(crate) fn read(path: &Path, since_ms: u64, tail: Option<usize>) -> (Vec<Line>, Cursor) {
    let mut keep: VecDeque<Line> = VecDeque::new();
    let mut cursor = Cursor::default();
    let all = files(path);
    let last = all.len() - 1;
    for (i, f) in all.iter().enumerate() {
        let Ok(mut file) = File::open(f) else {
            continue;
        };
        if i == last {
            if let Ok(m) = file.metadata() {
                cursor.ino = m.ino();
            }
        }
        let mut text = Vec::new();
        if file.read_to_end(&mut text).is_err() {
            continue;
        }
        // Only whole lines: a follow reads a partial last line when it is complete.
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        if i == last {
            cursor.offset = whole as u64;
        }
        for raw in text[..whole].split(|b| *b == b'\n') {
            if raw.is_empty() {
                continue;
            }
            let l = parse(&String::from_utf8_lossy(raw));
            if l.0 < since_ms {
                continue;
            }
            keep.push_back(l);
            if tail.is_some_and(|t| keep.len() > t) {
                keep.pop_front();
            }
        }
    }
    (keep.into(), cursor)
}

/// New whole lines since `cursor` (following a rotation: the rest of the rotated file first).
/// Blocking, but reads only what is new.
pub(crate) fn read_new(path: &Path, cursor: &mut Cursor) -> Vec<Line> {
    let mut out = Vec::new();
    let Ok(meta) = std::fs::metadata(path) else {
        return out;
    };
    if meta.ino() != cursor.ino {
        // Rotated (once or more): the rest of our file, now `.K`, then the newer ones whole.
        let all = files(path);
        let older = &all[..all.len() - 1];
        if let Some(k) = older
            .iter()
            .position(|f| std::fs::metadata(f).is_ok_and(|m| m.ino() == cursor.ino))
        {
            read_from(&older[k], cursor.offset, &mut out);
            for f in &older[k + 1..] {
                read_from(f, 0, &mut out);
            }
        }
        *cursor = Cursor {
            ino: meta.ino(),
            offset: 0,
        };
    } else if meta.len() < cursor.offset {
        // Truncated (a single file, rotated in place).
        cursor.offset = 0;
    }
    cursor.offset += read_from(path, cursor.offset, &mut out);
    out
}

/// Whole lines of `path` from `offset`; returns the bytes consumed.
fn read_from(path: &Path, offset: u64, out: &mut Vec<Line>) -> u64 {
    let Ok(mut f) = File::open(path) else {
        return 0;
    };
    if f.seek(SeekFrom::Start(offset)).is_err() {
        return 0;
    }
    let mut r = BufReader::new(f);
    let mut used = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if buf.last() != Some(&b'\n') {
                    break;
                }
                used += n as u64;
                let s = String::from_utf8_lossy(&buf[..n - 1]);
                if !s.is_empty() {
                    out.push(parse(&s));
                }
            }
        }
    }
    used
}

/// The last lines of a log whose text is at most `max` bytes in all (oldest first).
pub(crate) fn last_lines(path: &Path, max: usize) -> Vec<Line> {
    last_lines_and_cursor(path, max).0
}

/// The last whole lines of a log whose text is at most `max` bytes in all (oldest first), and
/// where [`read_new`] goes on after them (no line lost or read twice between the two).
pub(crate) fn last_lines_and_cursor(path: &Path, max: usize) -> (Vec<Line>, Cursor) {
    let mut out: VecDeque<Line> = VecDeque::new();
    let mut cursor = Cursor::default();
    let mut total = 0usize;
    for (i, f) in files(path).iter().rev().enumerate() {
        let Ok(mut file) = File::open(f) else {
            continue;
        };
        let meta = file.metadata().ok();
        let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
        // Enough for `max` bytes of text with their prefixes.
        let want = (max as u64 * 2 + 4096).min(len);
        if file.seek(SeekFrom::Start(len - want)).is_err() {
            continue;
        }
        let mut buf = Vec::new();
        if file.read_to_end(&mut buf).is_err() {
            continue;
        }
        // Only whole lines: a partial last one is read by the next `read_new`.
        let whole = buf.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        if i == 0 {
            cursor = Cursor {
                ino: meta.map(|m| m.ino()).unwrap_or(0),
                offset: len - want + whole as u64,
            };
        }
        let mut chunk: Vec<&[u8]> = buf[..whole].split(|b| *b == b'\n').collect();
        if len > want && !chunk.is_empty() {
            chunk.remove(0); // starts mid-line
        }
        for raw in chunk.into_iter().rev() {
            if raw.is_empty() {
                continue;
            }
            let l = parse(&String::from_utf8_lossy(raw));
            total += l.2.len() + 1;
            if total > max {
                return (out.into(), cursor);
            }
            out.push_front(l);
        }
        if len > want {
            break;
        }
    }
    (out.into(), cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_within_the_bound_and_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let mut log = LogFile::open(&path, (4096, 3)).unwrap();
        for i in 0..1000u64 {
            log.write(
                1000 + i,
                Stream::Stdout,
                &format!("line {i:04} of the test"),
            )
            .unwrap();
        }
        let total: u64 = files(&path)
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        assert!(total <= 3 * 4096, "{total}");
        assert_eq!(files(&path).len(), 3);
        let (lines, mut cursor) = read(&path, 0, None);
        assert!(lines.len() > 100 && lines.len() < 1000, "{}", lines.len());
        assert_eq!(lines.last().unwrap().2, "line 0999 of the test");
        // Oldest first, no gap.
        let first: u64 = lines[0].0;
        for (k, l) in lines.iter().enumerate() {
            assert_eq!(l.0, first + k as u64);
        }
        let (tail, _) = read(&path, 0, Some(5));
        assert_eq!(tail.len(), 5);
        assert_eq!(tail[0].2, "line 0995 of the test");
        let (since, _) = read(&path, 1990, None);
        assert_eq!(since.len(), 10);
        // Following across a rotation loses nothing.
        for i in 1000..1200u64 {
            log.write(
                1000 + i,
                Stream::Stderr,
                &format!("line {i:04} of the test"),
            )
            .unwrap();
        }
        let new = read_new(&path, &mut cursor);
        assert_eq!(new.len(), 200, "{:?}", new.first());
        assert_eq!(new[0].2, "line 1000 of the test");
        assert_eq!(new[0].1, Stream::Stderr);
        assert!(read_new(&path, &mut cursor).is_empty());
        let last = last_lines(&path, 100);
        assert_eq!(last.last().unwrap().2, "line 1199 of the test");
        assert!(last.iter().map(|l| l.2.len() + 1).sum::<usize>() <= 100);
        // The tail and where to go on from it: nothing lost, nothing twice.
        let (last, mut cursor) = last_lines_and_cursor(&path, 100);
        assert_eq!(last.last().unwrap().2, "line 1199 of the test");
        log.write(5000, Stream::Stdout, "after the tail").unwrap();
        let new = read_new(&path, &mut cursor);
        assert_eq!(new.len(), 1, "{new:?}");
        assert_eq!(new[0].2, "after the tail");
    }

    #[test]
    fn splits_long_lines_and_keeps_partial_ones() {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        s.push(b"a\r\nb", &mut out);
        assert_eq!(out, vec!["a".to_string()]);
        s.push(&vec![b'x'; MAX_LINE + 5], &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].len(), MAX_LINE);
        assert_eq!(s.finish().unwrap().len(), 6);
    }
}
