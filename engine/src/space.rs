//! Free space of a file system, and how a replica's snapshot is staged given it.
//!
//! A snapshot taken to start a replica is read once, by the apply, and then has no further use: spending
//! CPU on compressing and decompressing it only pays when the staging directory is short of room. On
//! the 2-core bench machine zstd level 1 compresses COPY text at about 140 MB/s per core, which made a
//! replica's start 10-20% slower than staging it uncompressed (benches/README.md).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::chunk::Compression;

/// How many times the tables' size on disk the staging directory must have free for a snapshot to be
/// staged uncompressed: COPY text is usually smaller than the heap, but TOAST values are stored
/// compressed and come out whole, so a text-heavy table can print at a few times its size.
pub const UNCOMPRESSED_ROOM_FACTOR: u64 = 3;

/// Bytes an unprivileged process may still write on the file system holding `path`, or its nearest
/// existing ancestor when `path` does not exist yet.
#[allow(unsafe_code)]
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let mut p = path;
    while !p.exists() {
        p = p.parent().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no existing ancestor"))?;
    }
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: statvfs is a plain C struct of integers, for which all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `st` is written by statvfs and read
    // only when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The compression of a replica's snapshot when the user left it to the tool: none when `free` bytes
/// hold [`UNCOMPRESSED_ROOM_FACTOR`] times the tables' `table_bytes`, zstd level 1 otherwise.
pub fn replica_staging(free: u64, table_bytes: u64) -> Compression {
    if free / UNCOMPRESSED_ROOM_FACTOR >= table_bytes {
        Compression::None
    } else {
        Compression::Zstd { level: 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncompressed_only_with_room_to_spare() {
        assert_eq!(replica_staging(3_000, 1_000), Compression::None);
        assert_eq!(replica_staging(2_999, 1_000), Compression::Zstd { level: 1 });
        assert_eq!(replica_staging(0, 0), Compression::None);
        assert_eq!(replica_staging(u64::MAX, u64::MAX / 2), Compression::Zstd { level: 1 });
    }

    #[test]
    fn free_space_of_a_missing_path_is_its_ancestors() {
        let here = free_bytes(Path::new("/tmp")).unwrap();
        assert!(here > 0);
        let below = free_bytes(Path::new("/tmp/steep-repl-no-such-dir/deeper")).unwrap();
        // The same file system, read a moment apart.
        assert!(below.abs_diff(here) < here / 10 + (1 << 30));
    }
}
