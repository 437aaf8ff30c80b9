//! Named points where a test makes the process die at an exact instant:
//! with `INFINITETALK_BATCH_FAILPOINT=NAME` in its environment the process
//! aborts (as abruptly as `kill -9`) the first time it reaches `NAME`.
//! Without the variable a point costs one load of a cached value.

use std::sync::OnceLock;

/// The variable naming the point to die at (tests only).
pub const VAR: &str = "INFINITETALK_BATCH_FAILPOINT";

/// Dies here if the environment names this point.
pub fn hit(name: &str) {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var(VAR).ok().filter(|v| !v.is_empty()));
    if point.as_deref() == Some(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
