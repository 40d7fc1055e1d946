use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ocr_operator::run::{self, KafkaAdminKind, RunOptions};

#[derive(Parser)]
#[command(
    name = "ocr-operator",
    version,
    about = "Kubernetes operator for OCR pipelines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the OcrPipeline CustomResourceDefinition as YAML.
    Crdgen {
        /// Destination file; `-` writes to stdout.
        #[arg(long, short, default_value = "crds/ocrpipeline.yaml")]
        output: PathBuf,
    },
    /// Reconcile OcrPipelines in the cluster from KUBECONFIG (or in-cluster config).
    Run {
        /// Serves `/healthz` and `/metrics`.
        #[arg(long, env = "OCR_OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
        http_addr: SocketAddr,
        /// Namespace of the leader-election Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        #[arg(long, default_value = "ocr-operator-leader")]
        lease_name: String,
        /// This replica's identity in the Lease; defaults to the host name and process id.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// `rdkafka`: connect to each pipeline's Kafka to create missing topics and
        /// measure the writer group's lag. `external`: never connect; topics are
        /// provisioned elsewhere and writer → standard/batched migrations wait in
        /// DrainingResults.
        #[arg(long, env = "OCR_OPERATOR_KAFKA_ADMIN", value_enum, default_value_t = KafkaAdminKind::Rdkafka)]
        kafka_admin: KafkaAdminKind,
        /// Reconcile only the pipelines of these namespaces (comma-separated);
        /// it then lists and watches nothing at cluster scope, so Roles in
        /// those namespaces suffice. Absent: every namespace.
        #[arg(long, env = "OCR_OPERATOR_WATCH_NAMESPACES", value_delimiter = ',')]
        watch_namespaces: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crdgen { output } => run::crdgen(&output),
        Command::Run {
            http_addr,
            lease_namespace,
            lease_name,
            identity,
            kafka_admin,
            watch_namespaces,
        } => run::init_tracing().and_then(|()| {
            run::runtime()?.block_on(run::run(RunOptions {
                http_addr,
                lease_namespace,
                lease_name,
                identity,
                kafka_admin,
                watch_namespaces,
            }))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ocr-operator: {error}");
            ExitCode::FAILURE
        }
    }
}
