//! Pages/s of the Candle engine against the onnxruntime reference (rapidocr 3.10) on the CPU,
//! on the same pages, with 1 and with 2 threads.
//!
//!   scripts/make-bench-data.sh && scripts/fetch-models.sh
//!   cargo bench -p ocr-engine --bench cpu_vs_onnxruntime [-- --pages 8 --threads 1,2 --rounds 3]
//!
//! Pages: the first `--pages` English pages (1000×1300) of the synthetic benchmark that
//! `scripts/make-bench-data.sh` renders (default 8, as the benchmark's own timing runs).
//! Each thread count runs in fresh child processes: Candle with `RAYON_NUM_THREADS=N` (candle's
//! `utils::get_num_threads`, its matmul and the engine's rayon pool all follow it), and
//! `scripts/bench-onnxruntime.py --threads N` (onnxruntime intra-op threads, OpenCV and OpenMP
//! held to N; it sets up its own venv outside the repository). Both load the same ONNX files,
//! decode each PNG inside the timed loop, run detection + recognition page by page, and time
//! all pages after one warm-up page. `--rapidocr-batching` makes Candle batch lines as
//! rapidocr does (6 per forward) instead of the default GPU-sized batches.
//!
//! Besides wall-clock pages/s each side reports CPU seconds, which say more on a loaded box.
//! `--rounds` (default 3) repeats every pair of runs; the table gives medians, and each ratio
//! comes from the two runs of one round, so a host whose speed drifts between minutes (a
//! shared cloud machine: up to ±30 % here) moves both sides of a ratio together.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use ocr_engine::engine::{default_model_dir, ModelVariant, OcrEngine, PipelineConfig};

type Error = Box<dyn std::error::Error>;

/// Timings of one engine at one thread count, as both children print them.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Run {
    engine: String,
    threads: usize,
    pages: usize,
    lines: usize,
    seconds: f64,
    pages_per_s: f64,
    cpu_seconds: f64,
}

struct Args {
    pages: usize,
    threads: Vec<usize>,
    rapidocr_batching: bool,
    rounds: usize,
    child: bool,
    files: Vec<PathBuf>,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        pages: 8,
        threads: vec![1, 2],
        rapidocr_batching: false,
        rounds: 3,
        child: false,
        files: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            // cargo bench appends --bench to every harness = false target.
            "--bench" => {}
            "--pages" => a.pages = it.next().ok_or("--pages needs a value")?.parse()?,
            "--threads" => {
                a.threads = it
                    .next()
                    .ok_or("--threads needs a value")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--rapidocr-batching" => a.rapidocr_batching = true,
            "--rounds" => {
                a.rounds = it.next().ok_or("--rounds needs a value")?.parse()?;
                if a.rounds == 0 {
                    return Err("--rounds must be at least 1".into());
                }
            }
            "--child" => a.child = true,
            s if s.starts_with("--") => return Err(format!("unknown option {s}").into()),
            f => a.files.push(PathBuf::from(f)),
        }
    }
    Ok(a)
}

/// CPU seconds (user + system, all threads) this process has used.
fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes into the struct it is given.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// The Candle side, in a child process whose thread count the parent fixed.
fn candle_child(a: &Args) -> Result<(), Error> {
    let first = a.files.first().ok_or("no pages given")?;
    let config = if a.rapidocr_batching {
        PipelineConfig::rapidocr()
    } else {
        PipelineConfig::default()
    };
    let engine = OcrEngine::load(ModelVariant::V6Small, &default_model_dir(), &Device::Cpu)?
        .with_config(config);
    engine.recognize(&std::fs::read(first)?)?; // warm-up
    let (c0, t0) = (cpu_seconds(), Instant::now());
    let mut lines = 0;
    for f in &a.files {
        lines += engine.recognize(&std::fs::read(f)?)?.lines.len();
    }
    let seconds = t0.elapsed().as_secs_f64();
    let run = Run {
        engine: format!(
            "candle {} (ocr-engine, {} batching)",
            env!("CARGO_PKG_VERSION"),
            if a.rapidocr_batching {
                "rapidocr"
            } else {
                "default"
            }
        ),
        threads: candle_core::utils::get_num_threads(),
        pages: a.files.len(),
        lines,
        seconds,
        pages_per_s: a.files.len() as f64 / seconds,
        cpu_seconds: cpu_seconds() - c0,
    };
    println!("{}", serde_json::to_string(&run)?);
    Ok(())
}

fn bench_pages(n: usize) -> Result<Vec<PathBuf>, Error> {
    let dir = std::env::var_os("OCR_BENCH_DATA")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("OCR_TOOLS_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/ocr-serving")
                })
                .join("ocr-bench-data")
        });
    let gt = dir.join("docs/gt.jsonl");
    let text = std::fs::read_to_string(&gt).map_err(|e| {
        format!(
            "{}: {e}; run scripts/make-bench-data.sh first",
            gt.display()
        )
    })?;
    let mut pages = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["lang"] == "en" {
            let file = v["file"].as_str().ok_or("gt.jsonl entry without file")?;
            pages.push(dir.join("docs").join(file));
        }
    }
    pages.truncate(n);
    if pages.is_empty() {
        return Err("no English pages in the benchmark data".into());
    }
    Ok(pages)
}

/// Runs `cmd` and parses the JSON line it prints last.
fn run_child(mut cmd: Command) -> Result<Run, Error> {
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let last = stdout
        .lines()
        .rfind(|l| l.starts_with('{'))
        .ok_or_else(|| format!("{cmd:?} printed no result:\n{stdout}"))?;
    Ok(serde_json::from_str(last)?)
}

fn main() -> Result<(), Error> {
    let a = parse_args()?;
    if a.child {
        return candle_child(&a);
    }
    let pages = bench_pages(a.pages)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench-onnxruntime.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let me = std::env::current_exe()?;
    // The ratio depends on the CPU (onnxruntime's kernels and ours do not gain
    // alike from each instruction set), so the header names it.
    println!(
        "{} English benchmark pages (1000x1300) from {}, v6-small, {} cores of {}",
        pages.len(),
        pages[0]
            .parent()
            .map_or("?".into(), |p| p.display().to_string()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );

    // Rounds alternate which engine goes first, and each ratio is taken within one round, from
    // two runs seconds apart: on a shared host the speed of the machine drifts by tens of
    // per cent within minutes, which a ratio of runs far apart would take for a difference
    // between the engines.
    let mut rows: Vec<(usize, Vec<(Run, Run)>)> =
        a.threads.iter().map(|&t| (t, Vec::new())).collect();
    for round in 0..a.rounds {
        for (t, pairs) in rows.iter_mut() {
            let t = *t;
            let candle_first = round % 2 == 0;
            let (candle, ort) = if candle_first {
                let candle = run_candle(&me, &pages, t, a.rapidocr_batching)?;
                (candle, run_ort(&python, &script, &pages, t)?)
            } else {
                let ort = run_ort(&python, &script, &pages, t)?;
                (run_candle(&me, &pages, t, a.rapidocr_batching)?, ort)
            };
            for r in [&candle, &ort] {
                println!(
                    "round {} threads {t}: {:<45} {:>6.3} pages/s  {:>6.2} s/page  {:>6.2} CPU s/page  {} lines",
                    round + 1,
                    r.engine,
                    r.pages_per_s,
                    r.seconds / r.pages as f64,
                    r.cpu_seconds / r.pages as f64,
                    r.lines
                );
            }
            pairs.push((candle, ort));
        }
    }

    println!(
        "\n| threads | Candle pages/s | onnxruntime pages/s | Candle/ORT (wall) | lowest-highest of {} rounds | Candle/ORT (CPU time per page, inverse) |",
        a.rounds
    );
    println!("|---|---|---|---|---|---|");
    for (t, pairs) in &rows {
        let wall: Vec<f64> = pairs
            .iter()
            .map(|(c, o)| c.pages_per_s / o.pages_per_s)
            .collect();
        let cpu: Vec<f64> = pairs
            .iter()
            .map(|(c, o)| (o.cpu_seconds / o.pages as f64) / (c.cpu_seconds / c.pages as f64))
            .collect();
        let (low, high) = wall
            .iter()
            .fold((f64::INFINITY, 0f64), |(l, h), &r| (l.min(r), h.max(r)));
        println!(
            "| {t} | {:.3} | {:.3} | {:.2}x | {low:.2}-{high:.2}x | {:.2}x |",
            median(pairs.iter().map(|(c, _)| c.pages_per_s).collect()),
            median(pairs.iter().map(|(_, o)| o.pages_per_s).collect()),
            median(wall),
            median(cpu),
        );
    }
    println!(
        "(medians over rounds; ratio > 1: Candle is faster; load average now {})",
        loadavg()
    );
    Ok(())
}

fn run_candle(
    me: &Path,
    pages: &[PathBuf],
    threads: usize,
    rapidocr_batching: bool,
) -> Result<Run, Error> {
    let mut candle = Command::new(me);
    candle
        .arg("--child")
        .args(pages)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string());
    if rapidocr_batching {
        candle.arg("--rapidocr-batching");
    }
    let candle = run_child(candle)?;
    if candle.threads != threads {
        return Err(format!("candle ran {} threads, not {threads}", candle.threads).into());
    }
    Ok(candle)
}

fn run_ort(python: &str, script: &Path, pages: &[PathBuf], threads: usize) -> Result<Run, Error> {
    let mut ort = Command::new(python);
    ort.arg(script)
        .arg("--threads")
        .arg(threads.to_string())
        .args(pages);
    run_child(ort)
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The CPU's model name and the vector extensions that matter to both engines.
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    };
    let model = field("model name").unwrap_or_else(|| "an unknown CPU".into());
    let flags = field("flags").unwrap_or_default();
    let has: Vec<&str> = ["avx2", "avx512f", "avx512_vnni", "amx_tile"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    format!("{model} ({})", has.join(", "))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
