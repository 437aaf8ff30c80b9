//! TEMPORARY stub; replaced by the inbox branch.
use crate::ingest::Folders;
use crate::store::{BatchRecord, Store};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
pub struct InboxConfig {
    pub folders: Folders,
    pub settle: Duration,
    pub rescan_every: Duration,
    pub simulated: bool,
}
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("x")]
    X,
}
pub async fn watch(
    store: Store,
    config: InboxConfig,
    on_batch: impl Fn(BatchRecord) + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> Result<(), InboxError> {
    let _ = (store, config, on_batch);
    shutdown.cancelled().await;
    Ok(())
}
