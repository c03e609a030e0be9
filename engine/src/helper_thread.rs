//! Helper threads for code that runs inside another program's process (a PostgreSQL backend).
//!
//! PostgreSQL handles its signals (cancel, terminate, latch wake-ups) in whichever thread the kernel
//! picks among those that do not block them, and its handlers assume the backend's own thread. A
//! helper thread started here blocks every signal from its first instruction on, so the host's
//! signals always reach the threads that were there before it. Helpers run pure Rust only: nothing
//! in this crate calls into PostgreSQL.

use std::io;
use std::thread::{Builder, Scope, ScopedJoinHandle};

/// Blocks, in the calling thread, every signal that can be blocked (SIGKILL and SIGSTOP cannot);
/// returns the mask it had before.
#[allow(unsafe_code)]
pub fn block_all_signals() -> libc::sigset_t {
    // SAFETY: sigfillset initialises a set we own; pthread_sigmask changes this thread's mask only
    // and writes the old mask into a value we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

/// Sets the calling thread's signal mask back to `old` (from [`block_all_signals`]).
#[allow(unsafe_code)]
pub fn restore_signals(old: &libc::sigset_t) {
    // SAFETY: pthread_sigmask reads a mask we own and changes this thread's mask only.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
    }
}

/// Starts `f` on a new thread of `scope` that never takes a signal: the caller's signals are
/// blocked while the thread is created (a new thread inherits its creator's mask), then restored,
/// so no signal can reach the helper even before it runs. Fails only when the system cannot start
/// a thread; callers then do the work themselves.
pub fn spawn_scoped<'scope, 'env, T, F>(
    scope: &'scope Scope<'scope, 'env>,
    f: F,
) -> io::Result<ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    let old = block_all_signals();
    let handle = Builder::new().name("steep-helper".into()).spawn_scoped(scope, f);
    restore_signals(&old);
    handle
}

/// Runs `beside` on a helper thread (see [`spawn_scoped`]) while `here` runs on the calling thread,
/// and returns both results once both are done. `beside`'s result is `None` when no thread could be
/// started (`beside` did not run: the caller does that work itself). A panic in `beside` is
/// resumed here, after `here` has returned.
pub fn run_beside<A, B>(beside: impl FnOnce() -> A + Send, here: impl FnOnce() -> B) -> (Option<A>, B)
where
    A: Send,
{
    std::thread::scope(|s| {
        let helper = spawn_scoped(s, beside).ok();
        let mine = here();
        let theirs = helper.map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        (theirs, mine)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn blocked_now(signal: i32) -> bool {
        // SAFETY: reads this thread's mask into a set we own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
            libc::sigismember(&set, signal) == 1
        }
    }

    #[test]
    fn helpers_block_signals_and_the_caller_keeps_its_mask() {
        assert!(!blocked_now(libc::SIGUSR1));
        let in_helper = std::thread::scope(|s| {
            let h =
                spawn_scoped(s, || (blocked_now(libc::SIGUSR1), blocked_now(libc::SIGINT))).expect("spawn");
            h.join().expect("join")
        });
        assert_eq!(in_helper, (true, true));
        assert!(!blocked_now(libc::SIGUSR1));
    }

    #[test]
    fn run_beside_returns_both_results() {
        let mut seen = Vec::new();
        let (theirs, mine) = run_beside(|| blocked_now(libc::SIGTERM), || seen.push(1));
        assert_eq!((theirs, mine), (Some(true), ()));
        assert_eq!(seen, [1]);
    }
}
