use anyhow::Context;
use clap::{Parser, Subcommand};
use ocr_runtime::config::Config;
use ocr_runtime::engine::CandleRecognizer;
use ocr_runtime::queue::kafka::KafkaConnection;
use ocr_runtime::roles::{self, Running};
use ocr_runtime::storage::JobStore;
use ocr_runtime::telemetry::LogTo;
use std::path::PathBuf;
use std::sync::Arc;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ocr-runtime",
    version,
    about = "Asynchronous OCR serving runtime"
)]
struct Cli {
    /// TOML configuration file; `OCR_*` environment variables override it.
    #[arg(long, global = true, env = "OCR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// API, worker and CPU engine in one process, on SQLite and a local directory.
    Standalone,
    /// HTTP API: stores jobs in MySQL and publishes them to Kafka.
    Api,
    /// GPU worker: consumes jobs from Kafka, runs OCR; records results
    /// (standard, batched) or publishes them to the results topic (writer).
    Worker,
    /// Result writer: persists result events (database, result document,
    /// completion webhook), with retries and a dead-letter topic.
    Writer {
        /// Exit 0 once the results topic is drained (consumer lag 0).
        #[arg(long)]
        drain: bool,
    },
    /// Print a consumer group's lag on a topic, per partition.
    Lag {
        /// Default: the jobs topic.
        #[arg(long)]
        topic: Option<String>,
        /// Default: the writer group for the results topic, else the worker group.
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Recognise image files and print the text (or JSON).
    Recognize {
        files: Vec<PathBuf>,
        /// Print the pages as JSON.
        #[arg(long)]
        json: bool,
        /// v6-small, v6-tiny or v5-mobile.
        #[arg(long)]
        model: Option<ocr_contract::ModelVariant>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// The dead-letter topic.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// API keys, stored hashed in the job database (`database.url`).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Load against a running API: closed loop (--connections) or open loop
    /// (--rate, latency counted from when each request was due), HDR
    /// percentiles, optionally following each job to its end (--follow).
    Loadgen(LoadgenArgs),
}

#[derive(clap::Args)]
struct LoadgenArgs {
    /// The API: its HTTP address, or with --grpc its gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long)]
    grpc: bool,
    /// The image every request submits (.png, .jpg, .tif, .webp, .bmp).
    #[arg(long)]
    image: PathBuf,
    /// API key (`Authorization: Bearer`).
    #[arg(long, env = ocr_contract::env::API_KEY, hide_env_values = true)]
    key: Option<String>,
    /// Closed loop: requests in flight at all times (the default, 16).
    #[arg(long, conflicts_with = "rate")]
    connections: Option<usize>,
    /// Open loop: requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to send, e.g. 30s or 2m (default 10s).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "requests")]
    duration: Option<std::time::Duration>,
    /// Send this many requests instead.
    #[arg(long, conflicts_with = "until_interrupted")]
    requests: Option<u64>,
    /// Send until interrupted (SIGINT or SIGTERM), then wait for the answers
    /// and print the summary. Any run stops early this way.
    #[arg(long, conflicts_with = "duration")]
    until_interrupted: bool,
    /// Give job N the idempotency key PREFIX-N and send it again (same key,
    /// every 300 ms) until it is accepted, as a careful client does.
    #[arg(long, value_name = "PREFIX")]
    retry_with_keys: Option<String>,
    /// Append every accepted job to this file as it is accepted, one JSON
    /// object per line: {"key": ..., "id": ...}.
    #[arg(long, value_name = "FILE")]
    jobs_out: Option<PathBuf>,
    /// Follow each accepted job to its final state, for at most this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    follow: Option<std::time::Duration>,
    /// Print the summary as JSON (alone on stdout).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum KeysAction {
    /// Make a key for a tenant. The key is printed once, alone on the last line.
    Create {
        /// 1 to 64 of a-z, 0-9, '.', '_', '-'.
        #[arg(long)]
        tenant: String,
    },
    /// Every key: id, tenant, when it was made and revoked. Never the key.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id (or the whole key). API processes stop
    /// accepting it within `auth.key_cache_ms`.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Send everything dead-lettered back: jobs are reset and requeued,
    /// undelivered notifications go back to the writer. Prints a JSON summary.
    Replay {
        /// The consumer group the replay reads as; what it replayed is committed.
        #[arg(long, default_value = "ocr-dlq-replay")]
        group: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_to = if cli.command.is_server() {
        LogTo::Stdout
    } else {
        LogTo::Stderr
    };
    let telemetry = ocr_runtime::telemetry::init(cli.command.role(), log_to);
    let outcome = run(cli).await;
    telemetry.shutdown().await;
    outcome
}

impl Command {
    /// Servers run until stopped; the other commands are tools with output.
    fn is_server(&self) -> bool {
        matches!(
            self,
            Command::Standalone | Command::Api | Command::Worker | Command::Writer { .. }
        )
    }

    /// The service name in traces: `ocr-<role>`.
    fn role(&self) -> &'static str {
        match self {
            Command::Standalone => "standalone",
            Command::Api => "api",
            Command::Worker => "worker",
            Command::Writer { .. } => "writer",
            Command::Lag { .. } => "lag",
            Command::Recognize { .. } => "recognize",
            Command::Migrate => "migrate",
            Command::Dlq { .. } => "dlq",
            Command::Keys { .. } => "keys",
            Command::Loadgen(_) => "loadgen",
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Standalone => {
            let engine = load_engine(&config)?;
            let server = ocr_runtime::standalone::start(&config, engine).await?;
            let front = server
                .front_ends
                .context("the standalone server serves the API")?;
            let scheme = if front.tls { "https" } else { "http" };
            println!("OCR server listening on {scheme}://{}", front.http_addr);
            let reflection = if config.server.grpc_reflection {
                " (with reflection)"
            } else {
                ""
            };
            println!("gRPC{reflection} on {}", front.grpc_addr);
            if !front.keys_required {
                println!("API keys optional: requests without one are the tenant \"anonymous\"");
            } else if let Some(key) =
                ocr_runtime::standalone::first_key(&server.store, &front).await?
            {
                println!(
                    "API keys required. No key existed, so key {} was made for tenant \"{}\"; send it as `Authorization: Bearer <key>`. It is shown this once:",
                    key.id,
                    ocr_runtime::standalone::FIRST_TENANT
                );
                println!("{}", key.token);
            } else {
                println!("API keys required (`Authorization: Bearer <key>`); make one with `ocr-runtime keys create --tenant NAME`");
            }
            run_until_signal(server).await
        }
        Command::Api => run_until_signal(roles::start_api(&config).await?).await,
        Command::Worker => {
            let engine = load_engine(&config)?;
            run_until_signal(roles::start_worker(&config, engine).await?).await
        }
        Command::Writer { drain } => {
            config.writer.drain |= drain;
            run_until_signal(roles::start_writer(&config).await?).await
        }
        Command::Lag { topic, group, json } => print_lag(&config, topic, group, json).await,
        Command::Recognize { files, json, model } => {
            if let Some(model) = model {
                config.model.variant = model;
            }
            recognize_files(&config, &files, json)
        }
        Command::Dlq {
            action: DlqAction::Replay { group },
        } => replay_dead_letters(&config, &group).await,
        Command::Keys { action } => manage_keys(&config, action).await,
        Command::Loadgen(args) => load(args).await,
        Command::Migrate => {
            let store = JobStore::connect(&config.database.url, 1).await?;
            store.migrate().await?;
            println!(
                "migrations applied to {}",
                ocr_contract::redact_url(&config.database.url)
            );
            Ok(())
        }
    }
}

async fn replay_dead_letters(config: &Config, group: &str) -> anyhow::Result<()> {
    use ocr_runtime::app::replay::Replay;
    use ocr_runtime::queue::kafka::{KafkaConsumer, KafkaPublisher};
    let kafka = KafkaConnection::from_config(&config.queue)?;
    let topic = &config.queue.dead_letter_topic;
    let pending = roles::group_lag(&kafka, group, topic)
        .await
        .with_context(|| format!("measuring what {topic} holds for group {group}"))?
        .total;
    let store = JobStore::connect(&config.database.url, 2)
        .await
        .context("opening the job store")?;
    let mut dead_letters = KafkaConsumer::new(&kafka, group, topic)?;
    let jobs = KafkaPublisher::new(&kafka, &config.queue.jobs_topic)?;
    let results = KafkaPublisher::new(&kafka, &config.queue.results_topic)?;
    let replayed = Replay {
        dead_letters: &mut dead_letters,
        store: &store,
        jobs: &jobs,
        results: &results,
    }
    .run(pending.max(0) as u64)
    .await?;
    jobs.flush();
    results.flush();
    println!("{}", serde_json::to_string(&replayed)?);
    Ok(())
}

async fn load(args: LoadgenArgs) -> anyhow::Result<()> {
    use ocr_runtime::loadgen::{Pacing, Plan, Protocol, Retry, Stop};
    let content_type = match args
        .image
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("tif" | "tiff") => "image/tiff",
        Some("webp") => "image/webp",
        Some("bmp") => "image/bmp",
        _ => anyhow::bail!(
            "{}: name a .png, .jpg, .tif, .webp or .bmp file",
            args.image.display()
        ),
    };
    let image =
        std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let (accepted_jobs, journal) = match &args.jobs_out {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            let (jobs, mut accepted) = tokio::sync::mpsc::unbounded_channel();
            let path = path.clone();
            // Line by line as jobs are accepted, so whoever reads the file
            // while the load runs sees every job the API has answered for.
            let writing = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                use std::io::Write;
                let mut file = file;
                while let Some(job) = accepted.blocking_recv() {
                    let line = serde_json::to_string(&job)?;
                    writeln!(file, "{line}")
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                Ok(())
            });
            (Some(jobs), Some(writing))
        }
        None => (None, None),
    };
    let plan = Plan {
        target: args.url,
        protocol: if args.grpc {
            Protocol::Grpc
        } else {
            Protocol::Http
        },
        key: args.key,
        image: image.into(),
        content_type: content_type.to_owned(),
        pacing: match args.rate {
            Some(per_second) => Pacing::Open { per_second },
            None => Pacing::Closed {
                connections: args.connections.unwrap_or(16),
            },
        },
        stop: match (args.requests, args.until_interrupted) {
            (Some(n), _) => Stop::Requests(n),
            (None, true) => Stop::Cancelled,
            (None, false) => {
                Stop::After(args.duration.unwrap_or(std::time::Duration::from_secs(10)))
            }
        },
        follow: args.follow,
        progress: !args.json,
        retry: args.retry_with_keys.map(|key_prefix| Retry {
            key_prefix,
            pause: std::time::Duration::from_millis(300),
        }),
        cancel: cancel.clone(),
        accepted_jobs,
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("interrupted: no new requests; waiting for the answers");
        cancel.cancel();
    });
    let summary = ocr_runtime::loadgen::run(plan).await?;
    if let Some(writing) = journal {
        writing.await.context("writing --jobs-out")??;
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.to_text());
    }
    Ok(())
}

async fn manage_keys(config: &Config, action: KeysAction) -> anyhow::Result<()> {
    use ocr_runtime::domain::tenant::{key_id, NewKey, Tenant};
    let store = roles::open_job_store(config, None).await?;
    let now = ocr_runtime::storage::now_ms();
    match action {
        KeysAction::Create { tenant } => {
            let tenant = Tenant::parse(&tenant)?;
            let key = NewKey::generate().context("the system's random number generator")?;
            store
                .create_key(&tenant, &key, now)
                .await
                .context("storing the key")?;
            println!(
                "created key {} for tenant {tenant}; it is shown once, keep it now:",
                key.id
            );
            println!("{}", key.token);
        }
        KeysAction::List { json } => {
            let keys = store.list_keys().await.context("listing keys")?;
            if json {
                println!("{}", serde_json::to_string(&keys)?);
            } else {
                println!(
                    "{:<16}  {:<24}  {:>15}  {:>15}",
                    "ID", "TENANT", "CREATED_MS", "REVOKED_MS"
                );
                for key in keys {
                    let revoked = key
                        .revoked_at_ms
                        .map_or("-".to_owned(), |at| at.to_string());
                    println!(
                        "{:<16}  {:<24}  {:>15}  {:>15}",
                        key.id, key.tenant, key.created_at_ms, revoked
                    );
                }
            }
        }
        KeysAction::Revoke { id } => {
            let id = key_id(&id).unwrap_or(&id).to_owned();
            let revoked = store
                .revoke_key(&id, now)
                .await
                .context("revoking the key")?;
            anyhow::ensure!(revoked, "no key {id:?} that is not revoked already");
            println!("revoked key {id}");
        }
    }
    Ok(())
}

async fn run_until_signal(running: Running) -> anyhow::Result<()> {
    let token = running.shutdown_token();
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down"),
        _ = token.cancelled() => {}
    }
    running.stop().await;
    Ok(())
}

async fn print_lag(
    config: &Config,
    topic: Option<String>,
    group: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let topic = topic.unwrap_or_else(|| config.queue.jobs_topic.clone());
    let group = group.unwrap_or_else(|| {
        if topic == config.queue.results_topic {
            config.queue.writer_group.clone()
        } else {
            config.queue.consumer_group.clone()
        }
    });
    let kafka = KafkaConnection::from_config(&config.queue)?;
    let lag = roles::group_lag(&kafka, &group, &topic)
        .await
        .with_context(|| format!("measuring the lag of group {group} on {topic}"))?;
    if json {
        println!("{}", serde_json::to_string(&lag)?);
    } else {
        println!("topic {} group {}: lag {}", lag.topic, lag.group, lag.total);
        for p in &lag.partitions {
            let committed = p.committed.map_or("-".to_owned(), |c| c.to_string());
            println!(
                "  partition {:>3}  committed {:>10}  end {:>10}  lag {:>8}",
                p.partition, committed, p.high_watermark, p.lag
            );
        }
    }
    Ok(())
}

fn load_engine(config: &Config) -> anyhow::Result<Arc<CandleRecognizer>> {
    let limits = ocr_runtime::app::input::decode_limits(&config.limits);
    Ok(Arc::new(
        CandleRecognizer::load(&config.model)?.with_decode_limits(limits),
    ))
}

fn recognize_files(config: &Config, files: &[PathBuf], json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(!files.is_empty(), "name at least one image file");
    let engine = load_engine(config)?;
    let inputs = files
        .iter()
        .map(|f| std::fs::read(f).with_context(|| format!("reading {}", f.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let views: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
    let mut failed = 0;
    for (file, page) in files.iter().zip(engine.engine().recognize_batch(&views)) {
        match page {
            Ok(page) if json => println!("{}", serde_json::to_string(&page)?),
            Ok(page) => {
                println!("== {}", file.display());
                println!("{}", page.text);
            }
            Err(err) => {
                failed += 1;
                eprintln!("{}: {err}", file.display());
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} files failed", files.len());
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
