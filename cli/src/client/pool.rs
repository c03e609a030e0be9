//! Driving a client-mode job's worker tasks (one per connection), the same for generate and apply.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error::CliError;
use crate::signals::Interrupt;

/// Waits for every task in `set` to end, calling `tick` every `every` (progress reporting). The first
/// error, a panicked task, or an interrupt (made into an error by `on_interrupt`) tells every task to
/// stop through `stop_tx`; the tasks hold its receiver. Returns the first failure, if any.
pub async fn run_workers(
    mut set: JoinSet<Result<(), CliError>>,
    stop_tx: &watch::Sender<bool>,
    interrupt: &mut Interrupt,
    on_interrupt: impl Fn(&str) -> CliError,
    every: Duration,
    mut tick: impl FnMut(),
) -> Option<CliError> {
    let mut ticker = tokio::time::interval(every);
    let mut failure: Option<CliError> = None;
    loop {
        tokio::select! {
            sig = interrupt.recv(), if failure.is_none() => {
                failure = Some(on_interrupt(sig));
                stop_tx.send_replace(true);
            }
            joined = set.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    failure.get_or_insert(e);
                    stop_tx.send_replace(true);
                }
                Some(Err(panic)) => {
                    failure.get_or_insert_with(|| CliError::Other(anyhow::anyhow!("a worker task failed: {panic}")));
                    stop_tx.send_replace(true);
                }
            },
            _ = ticker.tick() => tick(),
        }
    }
    failure
}
