//! Weft's benchmark load generator (dev-only): a lean HTTP/1.1 server ([`server`]), a closed-loop HTTP
//! client ([`http`]) and an idle-connection holder ([`idle`]), run inside dev-cluster pods so that the same
//! tool measures a direct path and a path through the proxy under test. It shares its CPU cores with that
//! proxy, so everything runs on a current-thread tokio runtime unless asked otherwise and keeps no per
//! connection state beyond what it needs. The command line is the `weft-load` binary.

pub mod http;
pub mod idle;
pub mod scale;
pub mod server;
pub mod stats;

use std::time::Duration;

/// The longest duration any option accepts (a year): keeps every `Instant + Duration` in range.
const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// A current-thread runtime for `threads <= 1`, else a multi-thread runtime with `threads` workers.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Parses a duration in (fractional) seconds, e.g. `0.5` or `30`; at most a year.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|e| format!("{s}: {e}"))?;
    if !(0.0..=MAX_SECS).contains(&secs) {
        return Err(format!("{s}: expected seconds between 0 and {MAX_SECS}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s}: {e}"))
}

/// Parses a count that must be at least 1.
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(format!("{s}: must be at least 1")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s}: {e}")),
    }
}

/// Finds the end of an HTTP header block: the index just past the first `\r\n\r\n`.
pub(crate) fn header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The header lines of a request or response head (everything after the start line), as `(name, value)`
/// with both trimmed; lines without a colon are skipped.
pub(crate) fn header_fields(head: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    head.split(|&b| b == b'\n').skip(1).filter_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        Some((line[..colon].trim_ascii(), line[colon + 1..].trim_ascii()))
    })
}

/// Whether a comma-separated header value (e.g. `Connection: keep-alive, Upgrade`) holds `token`,
/// case-insensitively.
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secs_and_counts() {
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("2"), Ok(Duration::from_secs(2)));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("NaN").is_err());
        assert!(parse_secs("1e30").is_err());
        assert_eq!(parse_positive("3"), Ok(3));
        assert!(parse_positive("0").is_err());
    }

    #[test]
    fn header_helpers() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nConnection:  Keep-Alive, CLOSE \r\n\r\n";
        assert_eq!(header_end(head), Some(head.len()));
        let fields: Vec<_> = header_fields(head).collect();
        assert_eq!(fields.len(), 2);
        assert_eq!(fields[1].0, b"Connection");
        assert!(has_token(fields[1].1, b"close"));
        assert!(!has_token(b"closed", b"close"));
    }
}
