//! Whether loading a snapshot will force checkpoints, and the settings that avoid them.
//!
//! A load writes WAL at a high rate. PostgreSQL starts a checkpoint whenever the WAL written since the
//! last one reaches `max_wal_size / (1 + checkpoint_completion_target)`, and every `checkpoint_timeout`.
//! Each checkpoint writes out the dirty buffers the load is still filling, and after each one the first
//! change to every page logs a full-page image, so a load into a server with the default
//! `max_wal_size = 1GB` runs at a fraction of its speed, with "checkpoints are occurring too frequently"
//! in the log and nothing telling the user why. An apply estimates its WAL and duration before loading
//! and names the setting to raise, and the value that avoids the checkpoints ([`advise`]).

use std::fmt;

/// WAL written per byte of COPY text loaded, for heap inserts and the index builds: measured on the bench
/// datasets with indexes built after the data (benches/README.md, issue 16), rounded up.
pub const WAL_PER_COPY_BYTE: f64 = 1.3;

/// COPY text one loading worker gets through per second, at the slow end of the bench datasets (those
/// where type input dominates): a load estimated from it takes at most about that long.
pub const COPY_BYTES_PER_WORKER_S: f64 = 40.0 * 1024.0 * 1024.0;

/// Loads estimated to run longer than this are not told to raise `checkpoint_timeout`: a checkpoint every
/// hour or so is what a long load should have (crash recovery stays short).
pub const LONGEST_TIMEOUT_ADVICE_S: f64 = 3600.0;

/// The server's checkpoint settings, as `pg_settings` gives them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub max_wal_size_bytes: u64,
    pub checkpoint_completion_target: f64,
    pub checkpoint_timeout_s: u64,
}

/// Reads [`Settings`] from a server, as `max_wal_size` in MB, `checkpoint_completion_target` and
/// `checkpoint_timeout` in seconds (`pg_settings`' units); see [`Settings::from_row`].
pub const SETTINGS_SQL: &str = "SELECT \
    (SELECT setting::pg_catalog.int8 FROM pg_catalog.pg_settings WHERE name = 'max_wal_size'), \
    (SELECT setting::pg_catalog.float8 FROM pg_catalog.pg_settings WHERE name = 'checkpoint_completion_target'), \
    (SELECT setting::pg_catalog.int8 FROM pg_catalog.pg_settings WHERE name = 'checkpoint_timeout')";

impl Settings {
    /// From the three columns of [`SETTINGS_SQL`]; None when one is missing.
    pub fn from_row(
        max_wal_size_mb: Option<i64>,
        completion_target: Option<f64>,
        timeout_s: Option<i64>,
    ) -> Option<Settings> {
        Some(Settings {
            max_wal_size_bytes: (max_wal_size_mb?.max(0) as u64) << 20,
            checkpoint_completion_target: completion_target?,
            checkpoint_timeout_s: timeout_s?.max(0) as u64,
        })
    }
}

/// What a load of `copy_bytes` of COPY text with `workers` workers is expected to cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub wal_bytes: u64,
    pub seconds: f64,
}

impl Estimate {
    pub fn of(copy_bytes: u64, workers: u32) -> Estimate {
        Estimate {
            wal_bytes: (copy_bytes as f64 * WAL_PER_COPY_BYTE) as u64,
            seconds: copy_bytes as f64 / (COPY_BYTES_PER_WORKER_S * workers.max(1) as f64),
        }
    }
}

/// One setting that will force checkpoints during the load.
#[derive(Debug, Clone, PartialEq)]
pub struct Advice {
    /// `max_wal_size` or `checkpoint_timeout`.
    pub setting: &'static str,
    /// Its value now, as SQL would set it (`1GB`, `5min`).
    pub current: String,
    /// A value that avoids the checkpoints.
    pub suggested: String,
    /// About how many checkpoints it would force.
    pub checkpoints: u64,
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {} forces about {} checkpoint{} during it: set {} = '{}' for the load",
            self.setting,
            self.current,
            self.checkpoints,
            if self.checkpoints == 1 { "" } else { "s" },
            self.setting,
            self.suggested
        )
    }
}

/// The settings that will force checkpoints during a load of `estimate`, each with a value that avoids
/// them; empty when none will.
pub fn advise(estimate: Estimate, s: Settings) -> Vec<Advice> {
    let mut advice = Vec::new();
    let spread = 1.0 + s.checkpoint_completion_target.max(0.0);
    let trigger = s.max_wal_size_bytes as f64 / spread;
    if trigger > 0.0 && estimate.wal_bytes as f64 > trigger {
        // Enough for the whole load plus a tenth, in whole gigabytes.
        let needed = estimate.wal_bytes as f64 * spread * 1.1;
        let gb = (needed / (1u64 << 30) as f64).ceil().max(1.0) as u64;
        advice.push(Advice {
            setting: "max_wal_size",
            current: size_text(s.max_wal_size_bytes),
            suggested: format!("{gb}GB"),
            checkpoints: (estimate.wal_bytes as f64 / trigger).floor() as u64,
        });
    }
    let timeout = s.checkpoint_timeout_s as f64;
    if timeout > 0.0 && estimate.seconds > timeout && estimate.seconds <= LONGEST_TIMEOUT_ADVICE_S {
        let minutes = (estimate.seconds * 1.2 / 60.0).ceil().max(1.0) as u64;
        advice.push(Advice {
            setting: "checkpoint_timeout",
            current: duration_text(s.checkpoint_timeout_s),
            suggested: format!("{minutes}min"),
            checkpoints: (estimate.seconds / timeout).floor() as u64,
        });
    }
    advice
}

/// One sentence for a job's progress, the log and the CLI: what the load will write and what to change.
pub fn warning(estimate: Estimate, advice: &[Advice]) -> Option<String> {
    if advice.is_empty() {
        return None;
    }
    let list: Vec<String> = advice.iter().map(|a| a.to_string()).collect();
    Some(format!(
        "this load will write about {} of WAL in about {}: {} (ALTER SYSTEM SET ...; SELECT pg_reload_conf(), \
         no restart needed)",
        size_text(estimate.wal_bytes),
        duration_text(estimate.seconds.ceil() as u64),
        list.join("; ")
    ))
}

/// `1GB`, `512MB`, `64kB`: the largest unit that divides the size, as PostgreSQL prints memory settings.
fn size_text(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "TB"), (1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "kB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    if bytes >= 1 << 30 {
        return format!("{:.1}GB", bytes as f64 / (1u64 << 30) as f64);
    }
    if bytes >= 1 << 20 {
        return format!("{}MB", bytes >> 20);
    }
    format!("{bytes}B")
}

fn duration_text(seconds: u64) -> String {
    if seconds >= 3600 && seconds % 3600 == 0 {
        format!("{}h", seconds / 3600)
    } else if seconds >= 60 && seconds % 60 == 0 {
        format!("{}min", seconds / 60)
    } else if seconds >= 120 {
        format!("{}min", seconds.div_ceil(60))
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: Settings = Settings {
        max_wal_size_bytes: 1 << 30,
        checkpoint_completion_target: 0.9,
        checkpoint_timeout_s: 300,
    };

    #[test]
    fn the_demo_load_on_default_settings_is_told_to_raise_max_wal_size() {
        // The demo snapshot: about 716 MB of chunks, about 2.5 GB of COPY text.
        let e = Estimate::of(2_500 << 20, 2);
        let advice = advise(e, DEFAULTS);
        assert_eq!(advice.len(), 1, "{advice:?}");
        assert_eq!(advice[0].setting, "max_wal_size");
        assert_eq!(advice[0].current, "1GB");
        // 3.2 GB of WAL x 1.9 x 1.1 = 6.6 GB.
        assert_eq!(advice[0].suggested, "7GB");
        assert_eq!(advice[0].checkpoints, 6);
        let w = warning(e, &advice).unwrap();
        assert!(w.contains("max_wal_size = 1GB forces about 6 checkpoints"), "{w}");
        assert!(w.contains("set max_wal_size = '7GB'"), "{w}");
        // With that value, nothing is left to say.
        let raised = Settings { max_wal_size_bytes: 7 << 30, ..DEFAULTS };
        assert!(advise(e, raised).is_empty());
    }

    #[test]
    fn small_loads_and_prepared_servers_get_no_advice() {
        assert!(advise(Estimate::of(100 << 20, 2), DEFAULTS).is_empty());
        let bench = Settings {
            max_wal_size_bytes: 16 << 30,
            checkpoint_completion_target: 0.9,
            checkpoint_timeout_s: 1800,
        };
        assert!(advise(Estimate::of(2 << 30, 2), bench).is_empty());
    }

    #[test]
    fn checkpoint_timeout_is_named_for_loads_longer_than_it_but_not_for_very_long_ones() {
        let s = Settings {
            max_wal_size_bytes: 1 << 40,
            checkpoint_completion_target: 0.9,
            checkpoint_timeout_s: 300,
        };
        // 40 GB with 2 workers at 40 MB/s each: about 512 s.
        let advice = advise(Estimate::of(40 << 30, 2), s);
        assert_eq!(advice.len(), 1, "{advice:?}");
        assert_eq!(advice[0].setting, "checkpoint_timeout");
        assert_eq!(advice[0].current, "5min");
        assert_eq!(advice[0].suggested, "11min");
        // 2 TB: hours; checkpoints on the timeout are expected.
        assert!(advise(Estimate::of(2 << 40, 2), s).iter().all(|a| a.setting != "checkpoint_timeout"));
    }

    #[test]
    fn sizes_and_durations_read_as_settings_do() {
        assert_eq!(size_text(1 << 30), "1GB");
        assert_eq!(size_text(512 << 20), "512MB");
        assert_eq!(size_text(80 << 20), "80MB");
        assert_eq!(size_text(3 * (1 << 30) + (1 << 29)), "3584MB");
        assert_eq!(duration_text(300), "5min");
        assert_eq!(duration_text(45), "45s");
        assert_eq!(duration_text(3600), "1h");
    }
}
