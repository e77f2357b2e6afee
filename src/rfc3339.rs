//! Times as the management API writes and reads them: RFC 3339, in UTC, to the second
//! (`2026-12-07T22:14:10Z`). A leaf on the `time` crate.

use std::time::SystemTime;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `t` as RFC 3339 in UTC, to the second.
pub fn format(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// A day as days since 1970-01-01 UTC, written `YYYY-MM-DD`.
pub fn day(days: u32) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(days) * 86_400);
    let date = OffsetDateTime::from(t).date();
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// An RFC 3339 time (any offset), or `None`.
pub fn parse(text: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn round_trip() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_681_650);
        assert_eq!(format(t), "2026-12-07T22:14:10Z");
        assert_eq!(parse("2026-12-07T22:14:10Z"), Some(t));
        assert_eq!(parse("2026-12-07T23:14:10+01:00"), Some(t));
        assert_eq!(
            format(t + Duration::from_millis(900)),
            "2026-12-07T22:14:10Z"
        );
        assert_eq!(day(1_796_681_650 / 86_400), "2026-12-07");
        for bad in ["", "2026-12-07", "tomorrow", "2026-13-07T22:14:10Z"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
