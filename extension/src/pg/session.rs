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

/// Runs `f` with `settings` changed for its duration only (as a function's SET clause does: a new GUC
/// nest level, popped afterwards; an ERROR inside is undone by the transaction's abort). For the SQL
/// functions whose catalog queries over many thousands of relations must not be JIT-compiled.
pub fn with_settings<R>(settings: &[(&str, &str)], f: impl FnOnce() -> R) -> R {
    with_settings_in(pg_sys::GucContext::PGC_USERSET, settings, f)
}

/// [`with_settings`] for settings only a superuser may change (`session_replication_role`): call only
/// after checking that the current user is a superuser.
pub fn with_superuser_settings<R>(settings: &[(&str, &str)], f: impl FnOnce() -> R) -> R {
    with_settings_in(pg_sys::GucContext::PGC_SUSET, settings, f)
}

fn with_settings_in<R>(
    context: pg_sys::GucContext::Type,
    settings: &[(&str, &str)],
    f: impl FnOnce() -> R,
) -> R {
    // SAFETY: inside a transaction (an SQL function call); NewGUCNestLevel/set_config_option with
    // GUC_ACTION_SAVE is how PostgreSQL applies a function's SET clause, and AtEOXact_GUC pops it.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    for (name, value) in settings {
        let (Ok(n), Ok(v)) = (CString::new(*name), CString::new(*value)) else { continue };
        // SAFETY: as above; an unknown setting or bad value raises an ERROR.
        unsafe {
            pg_sys::set_config_option(
                n.as_ptr(),
                v.as_ptr(),
                context,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
    }
    let r = f();
    // SAFETY: pops exactly the level pushed above, on the normal path.
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    r
}
