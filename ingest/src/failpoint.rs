//! Crash points for the crash-recovery tests.
//!
//! `HISTORIAN_FAILPOINT=<name>:<n>` aborts the process (no destructors, no flush: as a
//! `kill -9` would) the n-th time the named point is reached. Unset, a hit costs one
//! relaxed atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    name: String,
    at: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("HISTORIAN_FAILPOINT").ok()?;
            let (name, at) = spec.split_once(':').unwrap_or((spec.as_str(), "1"));
            Some(Armed {
                name: name.to_string(),
                at: at.parse().unwrap_or(1),
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Marks a crash point; aborts here if the environment armed it.
pub fn hit(name: &str) {
    if let Some(a) = armed()
        && a.name == name
        && a.hits.fetch_add(1, Ordering::Relaxed) + 1 == a.at
    {
        eprintln!("failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// `HISTORIAN_DELAY=<name>:<ms>` makes the named point wait that long, for the tests of
/// work that must finish after its client has gone. Unset, a pass costs one load.
pub async fn delay(name: &str) {
    static DELAY: OnceLock<Option<(String, u64)>> = OnceLock::new();
    let armed = DELAY.get_or_init(|| {
        let spec = std::env::var("HISTORIAN_DELAY").ok()?;
        let (name, ms) = spec.split_once(':')?;
        Some((name.to_string(), ms.parse().ok()?))
    });
    if let Some((armed, ms)) = armed
        && armed == name
    {
        tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
    }
}
