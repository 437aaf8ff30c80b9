//! A faithful simulator of the APIXO InfiniteTalk API (placeholder: being built).

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

/// Options of the simulator, as flags of `simulate` (and settable in tests).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SimArgs {}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub struct SimHandle {
    pub addr: SocketAddr,
}

impl SimHandle {
    pub async fn stopped(self) {}
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub async fn start(
    addr: SocketAddr,
    args: SimArgs,
    shutdown: CancellationToken,
) -> Result<SimHandle, SimError> {
    let _ = (addr, args, shutdown);
    todo!("simulator")
}

pub async fn run_standalone(listen: SocketAddr, args: SimArgs) -> anyhow::Result<()> {
    let _ = (listen, args);
    todo!()
}
