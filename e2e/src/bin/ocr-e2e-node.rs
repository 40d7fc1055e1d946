//! The e2e node agent: `ocr-e2e-node run --config node.toml` (uses
//! `KUBECONFIG`); `ocr-e2e-node launch SPEC` is its own per-container step.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ocr_e2e::node::{agent, config::AgentConfig, launch};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Runs the pods bound to one Node as local processes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register the Node and run its pods until SIGTERM/SIGINT.
    Run {
        #[arg(long, env = "OCR_E2E_NODE_CONFIG")]
        config: PathBuf,
    },
    /// Start one container from a launch spec (used by `run`).
    Launch { spec: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Launch { spec } => {
            let spec = launch::read_spec(&spec)?;
            match launch::launch(&spec) {
                Ok(never) => match never {},
                Err(error) => {
                    eprintln!("ocr-e2e-node launch: {error}");
                    std::process::exit(128);
                }
            }
        }
        Command::Run { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,kube=warn".into()),
                )
                .init();
            let config = AgentConfig::load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async move {
                let kube_config = kube::Config::infer()
                    .await
                    .context("reading the kubeconfig")?;
                let shutdown = CancellationToken::new();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    if let (Ok(mut term), Ok(mut int)) = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                    ) {
                        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                    }
                    stop.cancel();
                });
                agent::run(kube_config, config, shutdown).await?;
                anyhow::Ok(())
            })
        }
    }
}
