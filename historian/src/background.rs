//! The persister's threads: flushes and compactions sort, merge and encode Parquet, work
//! that can keep a core busy for seconds and only has to keep up on average (the write
//! buffer holds what waits). On threads of their own they do not hold up the server's
//! runtime (requests, result streaming, the accept loops); at a lower OS priority
//! (`persist.nice`) they also leave the CPU to queries and writes when those need it.

use std::future::Future;

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// A runtime whose worker and blocking threads run at `nice` (Linux; elsewhere at the
/// server's priority).
#[derive(Debug)]
pub struct BackgroundRuntime {
    runtime: Option<Runtime>,
}

impl BackgroundRuntime {
    /// Threads named `historian-persist`, one per core, at niceness `nice` (0 = the
    /// server's own priority; higher is lower priority, at most 19).
    pub fn new(nice: i32) -> std::io::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("historian-persist")
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()?;
        Ok(BackgroundRuntime {
            runtime: Some(runtime),
        })
    }

    /// Runs `work` on the background threads.
    pub fn spawn<F>(&self, work: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime
            .as_ref()
            .expect("the runtime lives until the value is dropped")
            .spawn(work)
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        // Dropped inside the server's runtime: do not block on the background threads.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Lowers the calling thread's priority to niceness `nice` (Linux keeps one per thread); a
/// thread already at that niceness or lower priority is left as it is.
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        if niceness() >= nice {
            return;
        }
        // SAFETY: setpriority takes no pointers; it only reads its arguments.
        let failed = unsafe { libc::setpriority(libc::PRIO_PROCESS, thread_id(), nice) != 0 };
        if failed {
            // Read before anything else can overwrite errno.
            let error = std::io::Error::last_os_error();
            tracing::warn!(
                nice,
                %error,
                "cannot lower the persister's thread priority; it runs at the server's"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    if nice > 0 {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                nice,
                "persist.nice is applied on Linux only; the persister runs at the server's priority"
            );
        });
    }
}

/// The calling thread's niceness.
#[cfg(target_os = "linux")]
fn niceness() -> i32 {
    // SAFETY: getpriority takes no pointers; it only reads its arguments.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, thread_id()) }
}

/// The calling thread's id, which Linux's priority calls take for one thread.
#[cfg(target_os = "linux")]
fn thread_id() -> libc::id_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn worker_and_blocking_threads_run_at_the_given_niceness() {
        let base = niceness();
        let background = BackgroundRuntime::new(7).unwrap();
        let server = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (worker, blocking) = server.block_on(async {
            background
                .spawn(async {
                    let blocking = tokio::task::spawn_blocking(niceness).await.unwrap();
                    (niceness(), blocking)
                })
                .await
                .unwrap()
        });
        // A test run already niced past 7 stays where it is.
        assert_eq!(worker, base.max(7));
        assert_eq!(blocking, base.max(7));
        assert_eq!(niceness(), base, "the caller's thread is untouched");
    }
}
