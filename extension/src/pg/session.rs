//! Session settings that change how values are printed and parsed.
//!
//! A background worker starts with the server's defaults, not the caller's session. Like pg_dump, every
//! worker pins the settings of `steep_repl_engine::copy_text::PINNED_SETTINGS` (DateStyle, IntervalStyle,
//! bytea_output, extra_float_digits) and takes TimeZone from the caller; the manifest records them all and
//! apply sets the same before COPY FROM parses a chunk.

use std::ffi::CString;

use pgrx::pg_sys;
use steep_repl_engine::copy_text::PINNED_SETTINGS;

/// Sets one setting for the rest of this session (as `SET name = value`).
pub fn set(name: &str, value: &str) {
    let (Ok(n), Ok(v)) = (CString::new(name), CString::new(value)) else {
        pgrx::error!("setting {name} to {value:?}: contains a NUL byte");
    };
    // SAFETY: inside a transaction (SetConfigOption may look up catalogs, e.g. time zones); it raises
    // an ERROR for an unknown setting or a bad value.
    unsafe {
        pg_sys::SetConfigOption(
            n.as_ptr(),
            v.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
        )
    };
}

/// Pins the output settings and the caller's time zone. Call inside a transaction.
pub fn pin_output_settings(timezone: &str) {
    for (name, value) in PINNED_SETTINGS {
        set(name, value);
    }
    if !timezone.is_empty() {
        set("TimeZone", timezone);
    }
}
