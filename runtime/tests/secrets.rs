//! No secret in any log line or error message. Every role runs as a real
//! process with known secrets (the database password, the Kafka SCRAM
//! password against a broker that requires it, a Redis password, the
//! webhook key) at debug level, through the paths that print URLs and
//! connection errors (a wrong database password, a Redis that refuses the
//! password), and every byte they print is searched for the secrets.

mod common;

use common::real_broker::RealBroker;
use common::{
    free_port, role_command, terminate, wait_for_status, wait_http_ok, MysqlDatabase,
    WebhookReceiver, INVOICE,
};
use ocr_runtime::config::{
    Config, KafkaSecurityConfig, QueueKind, SaslMechanism, Secret, SecurityProtocol,
};
use ocr_runtime::domain::JobStatus;
use ocr_runtime::queue::kafka::KafkaConnection;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

const DB_PASSWORD: &str = "db-Pa55-7f3a9c";
const WRONG_DB_PASSWORD: &str = "wrong-Pa55-c4e8";
const KAFKA_PASSWORD: &str = "kafka-Pa55-51e2";
const REDIS_PASSWORD: &str = "redis-Pa55-0b77";
const HOOK_URL_PASSWORD: &str = "hookurl-Pa55-3e1d";
const API_KEY: &str = "apikey-Pa55-9d2c61e0b7a54f3e8c1d";
const WRONG_API_KEY: &str = "apikey-wrong-Pa55-5a7e02c9d14b";

/// Runs `ocr-runtime ROLE` with its stdout and stderr in `log`.
fn spawn_logged(
    role: &[&str],
    config: &Config,
    port: u16,
    extra: &[(&str, String)],
    log: &Path,
) -> Child {
    let file = std::fs::File::create(log).expect("a log file");
    let mut command = role_command(role, config, port, extra);
    command
        .env("RUST_LOG", "debug")
        .stdout(Stdio::from(file.try_clone().expect("a second handle")))
        .stderr(Stdio::from(file));
    command.spawn().expect("spawning ocr-runtime")
}

async fn create_user(db: &MysqlDatabase, user: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::MySqlConnection::connect(&db.url)
        .await
        .expect("root connection");
    for statement in [
        format!("CREATE USER '{user}'@'%' IDENTIFIED BY '{DB_PASSWORD}'"),
        format!("GRANT ALL ON {}.* TO '{user}'@'%'", db.name),
    ] {
        sqlx::query(&statement)
            .execute(&mut conn)
            .await
            .expect("creating the database user");
    }
}

async fn drop_user(db: &MysqlDatabase, user: &str) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::MySqlConnection::connect(&db.url).await {
        let _ = sqlx::query(&format!("DROP USER IF EXISTS '{user}'@'%'"))
            .execute(&mut conn)
            .await;
    }
}

async fn create_topics(connection: &KafkaConnection) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        connection.client_config().create().expect("admin client");
    let topics = ["ocr.jobs", "ocr.results", "ocr.dead-letter"]
        .map(|topic| NewTopic::new(topic, 1, TopicReplication::Fixed(1)));
    let created = admin
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("CreateTopics answered");
    for result in created {
        result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
    }
}

fn run_to_end(mut child: Child) -> std::process::ExitStatus {
    child.wait().expect("waiting for ocr-runtime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_or_an_error_message() {
    let broker = RealBroker::start_with_scram_user("ocr", KAFKA_PASSWORD);
    let security = KafkaSecurityConfig {
        protocol: SecurityProtocol::SaslPlaintext,
        sasl_mechanism: SaslMechanism::ScramSha512,
        sasl_username: "ocr".into(),
        sasl_password: Secret::new(KAFKA_PASSWORD),
        ..KafkaSecurityConfig::default()
    };
    create_topics(&KafkaConnection::new(&broker.bootstrap_servers, &security).unwrap()).await;

    let db = MysqlDatabase::create().await;
    let user = format!("ocr_s{}", std::process::id());
    create_user(&db, &user).await;
    let with_password = |password: &str| {
        db.url
            .replacen("root@", &format!("{user}:{password}@"), 1)
            .replacen("root:@", &format!("{user}:{password}@"), 1)
    };
    assert!(
        with_password(DB_PASSWORD).contains(DB_PASSWORD),
        "{}",
        db.url
    );
    let blobs = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = |name: &str| -> PathBuf { logs.path().join(format!("{name}.log")) };
    let mut config = Config::default();
    config.database.url = with_password(DB_PASSWORD);
    config.blob.url = blobs.path().display().to_string();
    config.queue.kind = QueueKind::Kafka;
    config.queue.brokers = broker.bootstrap_servers.clone();
    let hook = WebhookReceiver::start(200).await;
    let kafka_env = vec![
        ("OCR_QUEUE__SECURITY__PROTOCOL", "sasl_plaintext".to_owned()),
        (
            "OCR_QUEUE__SECURITY__SASL_MECHANISM",
            "SCRAM-SHA-512".into(),
        ),
        ("OCR_QUEUE__SECURITY__SASL_USERNAME", "ocr".into()),
        ("OCR_QUEUE__SECURITY__SASL_PASSWORD", KAFKA_PASSWORD.into()),
    ];

    // The paths that print a database URL: migrating, and failing to connect.
    let migrated = run_to_end(spawn_logged(
        &["migrate"],
        &config,
        free_port(),
        &[],
        &log("migrate"),
    ));
    assert!(
        migrated.success(),
        "migrate failed; see {}",
        log("migrate").display()
    );
    let mut wrong = config.clone();
    wrong.database.url = with_password(WRONG_DB_PASSWORD);
    let refused = run_to_end(spawn_logged(
        &["migrate"],
        &wrong,
        free_port(),
        &[],
        &log("migrate-wrong-password"),
    ));
    assert!(!refused.success(), "a wrong password must fail");
    let refused_api = run_to_end(spawn_logged(
        &["api"],
        &wrong,
        free_port(),
        &kafka_env,
        &log("api-wrong-password"),
    ));
    assert!(!refused_api.success(), "a wrong password must stop the API");

    // The writer topology, end to end, with a Redis that refuses the password.
    let api_port = free_port();
    let mut api_env = kafka_env.clone();
    api_env.push((
        "OCR_REDIS__URL",
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:6379"),
    ));
    // Keys required, the tenant's key from a key folder (a mounted Secret).
    let keys = tempfile::tempdir().unwrap();
    std::fs::write(keys.path().join("tenant-s"), format!("{API_KEY}\n")).unwrap();
    api_env.push(("OCR_AUTH__MODE", "required".into()));
    api_env.push(("OCR_AUTH__KEYS_DIR", keys.path().display().to_string()));
    let api = spawn_logged(&["api"], &config, api_port, &api_env, &log("api"));
    let mut worker_env = kafka_env.clone();
    worker_env.push(("OCR_WORKER__MODE", "writer".into()));
    let worker = spawn_logged(
        &["worker"],
        &config,
        free_port(),
        &worker_env,
        &log("worker"),
    );
    let mut writer_env = kafka_env.clone();
    let hook_url = hook
        .url
        .replacen("http://", &format!("http://hook:{HOOK_URL_PASSWORD}@"), 1);
    writer_env.push(("OCR_WRITER__WEBHOOK_URL", hook_url));
    writer_env.push(("OCR_WRITER__WEBHOOK_SECRET", hook.secret.clone()));
    let writer = spawn_logged(
        &["writer"],
        &config,
        free_port(),
        &writer_env,
        &log("writer"),
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&base, "/readyz", Duration::from_secs(60)).await;
    let store = db.store().await;
    let submit = |key: &'static str| {
        reqwest::Client::new()
            .post(format!("{base}/v1/jobs"))
            .header("content-type", "image/png")
            .bearer_auth(key)
            .body(INVOICE.to_vec())
            .send()
    };
    let refused = submit(WRONG_API_KEY).await.expect("the API answers");
    assert_eq!(refused.status(), 401, "a wrong key is refused");
    for _ in 0..2 {
        let accepted: serde_json::Value = submit(API_KEY)
            .await
            .expect("the API answers")
            .json()
            .await
            .expect("a JSON answer");
        let id = accepted["id"].as_str().expect("an id").parse().unwrap();
        wait_for_status(&store, id, JobStatus::Succeeded, Duration::from_secs(180)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while hook.distinct().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the webhook was not called twice"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        hook.bad_signatures
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    for child in [api, worker, writer] {
        terminate(child).await;
    }
    drop_user(&db, &user).await;

    let read = |name: &str| std::fs::read_to_string(log(name)).unwrap_or_default();
    // The logs hold what the test needs them to: the paths above were taken.
    assert!(read("api").contains("API listening"), "{}", read("api"));
    assert!(
        read("api").contains("running without Redis"),
        "{}",
        read("api")
    );
    assert!(
        read("migrate-wrong-password").contains("Access denied"),
        "{}",
        read("migrate-wrong-password")
    );
    let secrets = [
        DB_PASSWORD,
        WRONG_DB_PASSWORD,
        KAFKA_PASSWORD,
        REDIS_PASSWORD,
        HOOK_URL_PASSWORD,
        API_KEY,
        WRONG_API_KEY,
        hook.secret.as_str(),
    ];
    for entry in std::fs::read_dir(logs.path()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.is_empty(), "{} is empty", path.display());
        for secret in secrets {
            if let Some(line) = text.lines().find(|line| line.contains(secret)) {
                panic!("{} prints a secret: {line}", path.display());
            }
        }
    }
}
