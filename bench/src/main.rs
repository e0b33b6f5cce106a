//! `bench`: the load generator and fake-TLS backend used to compare SNI passthrough proxies.
//!
//! See `bench --help`, `bench/README.md` and `scripts/bench-compare`.

mod aggregate;
mod backend;
mod bulk;
mod client;
mod connrate;
mod hello;
mod idle;
mod pattern;
mod procfs;
mod report;
mod session;
mod sys;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::client::{Outcome, Progress};
use crate::procfs::{CpuSnapshot, CpuUsage};
use crate::report::Report;

/// The ClientHello sent when neither `--hello` nor `--sni` is given: curl 7.88.1 with OpenSSL
/// 3.0.19, SNI `curl.example.test` (see bench/hellos/README.md).
const DEFAULT_HELLO: &[u8] = include_bytes!("../hellos/classic-curl.bin");

#[derive(Parser)]
#[command(
    name = "bench",
    version,
    about = "Load generator and fake-TLS backend for SNI passthrough proxies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fake TLS backend: discards one ClientHello, then echoes (or discards) everything after it.
    Backend {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value = "echo")]
        mode: backend::Mode,
        /// Event-loop threads, each with its own SO_REUSEPORT listener.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Exit after this many seconds (default: run until killed).
        #[arg(long, value_parser = parse_seconds)]
        duration: Option<Duration>,
    },
    /// New-connection rate: connect, send hello + payload, read the echo, close (FIN or RST).
    Connrate {
        #[command(flatten)]
        common: Common,
        /// Exchanges in flight at once (closed loop), or the cap on them (open loop).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, value_parser = parse_seconds, required_unless_present = "count")]
        duration: Option<Duration>,
        /// Stop after this many exchanges instead of after a duration.
        #[arg(long)]
        count: Option<u64>,
        /// Open loop: start this many exchanges per second (latency from the intended start).
        #[arg(long)]
        rate: Option<f64>,
        /// Bytes sent after the hello and expected back.
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// How a finished exchange closes: fin (orderly, TIME_WAIT on the client) or rst.
        #[arg(long, value_enum, default_value = "fin")]
        close: client::Close,
    },
    /// Request/response latency over persistent connections.
    Rr {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        request: usize,
        /// Must equal --request: the echo backend answers with the same bytes.
        #[arg(long)]
        response: Option<usize>,
        #[arg(long, value_parser = parse_seconds)]
        duration: Duration,
        /// Open loop: round trips per second over all connections.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Bulk throughput through the echo backend, every byte verified.
    Bulk {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, value_parser = parse_seconds)]
        duration: Duration,
        #[arg(long, default_value_t = 262_144)]
        write_size: usize,
    },
    /// Memory per idle proxied connection (PSS of --pid processes, kernel socket memory).
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        connections: usize,
        /// How many idle connections to check for a working echo before closing.
        #[arg(long, default_value_t = 100)]
        sample: usize,
        /// Wait this long after opening before measuring.
        #[arg(long, value_parser = parse_seconds, default_value = "1")]
        settle: Duration,
        /// Keep the connections open this long after measuring.
        #[arg(long, value_parser = parse_seconds, default_value = "0")]
        hold: Duration,
    },
    /// Write a synthetic ClientHello, or describe one.
    Hello {
        #[arg(long, default_value = "echo.bench.test")]
        sni: String,
        /// Total bytes on the wire (0: natural size).
        #[arg(long, default_value_t = 0)]
        size: usize,
        #[arg(long)]
        post_quantum: bool,
        /// Largest record payload; smaller values split the hello over several records.
        #[arg(long, default_value_t = hello::MAX_RECORD_PAYLOAD)]
        fragment: usize,
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print "SNI<TAB>BYTES" of this hello file (or of the built-in default with "-") instead.
        #[arg(long)]
        info: Option<PathBuf>,
    },
    /// Aggregate JSON lines of runs (from scripts/bench-compare) into JSON, Markdown and SVG.
    Report {
        /// JSON lines, one `bench ... --json` result per line.
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
    },
}

/// Options shared by the load-generating modes.
#[derive(Args, Clone)]
struct Common {
    #[arg(long)]
    target: SocketAddr,
    /// ClientHello file to send (default: the built-in curl capture).
    #[arg(long, conflicts_with = "sni")]
    hello: Option<PathBuf>,
    /// Send a synthetic ClientHello with this SNI instead of a captured one.
    #[arg(long)]
    sni: Option<String>,
    /// Size of the synthetic hello in bytes (with --sni).
    #[arg(long, default_value_t = 0, requires = "sni")]
    hello_size: usize,
    /// Give the synthetic hello a post-quantum key share (with --sni).
    #[arg(long, requires = "sni")]
    post_quantum: bool,
    /// Processes whose CPU (and, for idle, memory) to report, descendants included.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// Run this long before measuring.
    #[arg(long, value_parser = parse_seconds, default_value = "0")]
    warmup: Duration,
    /// Give up on one exchange (or connect) after this long.
    #[arg(long, value_parser = parse_seconds, default_value = "5")]
    timeout: Duration,
    /// Load-generator threads; connections and rate are split between them.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// KEY=VALUE added to the JSON output (repeatable), for grouping in `bench report`.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Show a progress line on stderr even when it is not a terminal.
    #[arg(long)]
    progress: bool,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("not a number of seconds: {text}"))?;
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text}"))
}

impl Common {
    fn hello_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let bytes = if let Some(path) = &self.hello {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        } else if let Some(name) = &self.sni {
            let mut spec = hello::HelloSpec::new(name);
            spec.size = self.hello_size;
            spec.post_quantum = self.post_quantum;
            hello::build_client_hello(&spec)
        } else {
            DEFAULT_HELLO.to_vec()
        };
        match hello::client_hello_end(&bytes) {
            Ok(Some(end)) if end == bytes.len() => Ok(bytes),
            Ok(Some(end)) => bail!("the hello has {} bytes after its end", bytes.len() - end),
            Ok(None) => bail!("the hello is truncated"),
            Err(e) => bail!("not a ClientHello: {e}"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Thousands of connections need thousands of descriptors; ignore failure (tests still run).
    let _ = sys::raise_open_file_limit();
    match cli.command {
        Command::Backend {
            listen,
            mode,
            threads,
            duration,
        } => run_backend(listen, mode, threads, duration),
        Command::Hello {
            sni,
            size,
            post_quantum,
            fragment,
            out,
            info,
        } => {
            if let Some(path) = info {
                let bytes = if path.as_os_str() == "-" {
                    DEFAULT_HELLO.to_vec()
                } else {
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
                };
                let name = hello::server_name(&bytes).context("no server_name in this hello")?;
                println!("{name}\t{}", bytes.len());
                return Ok(());
            }
            let spec = hello::HelloSpec {
                server_name: sni,
                size,
                post_quantum,
                fragment,
            };
            let bytes = hello::build_client_hello(&spec);
            match out {
                Some(path) => std::fs::write(&path, &bytes)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => std::io::stdout().write_all(&bytes)?,
            }
            Ok(())
        }
        Command::Report { input, out_dir } => aggregate::run(&input, &out_dir),
        Command::Connrate {
            common,
            concurrency,
            duration,
            count,
            rate,
            payload,
            close,
        } => {
            if payload == 0 {
                bail!("--payload must be at least 1: the echo proves the exchange went through");
            }
            let hello = Arc::new(common.hello_bytes()?);
            let threads = common.threads.max(1);
            let parameters = parameters(
                &common,
                &hello,
                json!({
                    "concurrency": concurrency, "duration_s": duration.map(|d| d.as_secs_f64()),
                    "count": count, "rate": rate, "payload": payload,
                    "close": close.name(),
                }),
            );
            let configs: Vec<connrate::Config> = (0..threads)
                .map(|index| connrate::Config {
                    target: common.target,
                    hello: hello.clone(),
                    payload,
                    concurrency: share(concurrency, threads, index).max(1),
                    rate: rate.map(|r| r / threads as f64),
                    duration,
                    count: count.map(|c| share(c as usize, threads, index) as u64),
                    warmup: common.warmup,
                    timeout: common.timeout,
                    close,
                })
                .collect();
            measure(&common, "connrate", parameters, |progress| {
                run_threads(configs, progress, |config, progress| {
                    connrate::run(&config, progress)
                })
            })
        }
        Command::Rr {
            common,
            connections,
            request,
            response,
            duration,
            rate,
        } => {
            if response.is_some_and(|r| r != request) {
                bail!("--response must equal --request: the echo backend answers byte for byte");
            }
            let hello = Arc::new(common.hello_bytes()?);
            let threads = common.threads.max(1).min(connections.max(1));
            let parameters = parameters(
                &common,
                &hello,
                json!({
                    "connections": connections, "request": request, "response": request,
                    "duration_s": duration.as_secs_f64(), "rate": rate,
                }),
            );
            let configs: Vec<RrThread> = (0..threads)
                .map(|index| RrThread {
                    target: common.target,
                    hello: hello.clone(),
                    connections: share(connections, threads, index),
                    request,
                    rate: rate.map(|r| r / threads as f64),
                    warmup: common.warmup,
                    duration,
                    timeout: common.timeout,
                })
                .collect();
            measure(&common, "rr", parameters, |progress| {
                run_threads(configs, progress, run_rr_thread)
            })
        }
        Command::Bulk {
            common,
            connections,
            duration,
            write_size,
        } => {
            let hello = Arc::new(common.hello_bytes()?);
            let threads = common.threads.max(1).min(connections.max(1));
            let parameters = parameters(
                &common,
                &hello,
                json!({
                    "connections": connections, "write_size": write_size,
                    "duration_s": duration.as_secs_f64(),
                }),
            );
            let configs: Vec<bulk::Config> = (0..threads)
                .map(|index| bulk::Config {
                    target: common.target,
                    hello: hello.clone(),
                    connections: share(connections, threads, index),
                    write_size,
                    warmup: common.warmup,
                    duration,
                    timeout: common.timeout,
                })
                .collect();
            measure(&common, "bulk", parameters, |progress| {
                run_threads(configs, progress, |config, progress| {
                    bulk::run(&config, progress)
                })
            })
        }
        Command::Idle {
            common,
            connections,
            sample,
            settle,
            hold,
        } => {
            let hello = Arc::new(common.hello_bytes()?);
            let parameters = parameters(
                &common,
                &hello,
                json!({
                    "connections": connections, "sample": sample, "settle_s": settle.as_secs_f64(),
                }),
            );
            let config = idle::Config {
                target: common.target,
                hello,
                connections,
                pids: common.pid.clone(),
                sample,
                settle,
                timeout: common.timeout,
                hold,
            };
            measure(&common, "idle", parameters, |progress| {
                idle::run(&config, progress)
            })
        }
    }
}

/// What one request/response load thread does.
struct RrThread {
    target: SocketAddr,
    hello: Arc<Vec<u8>>,
    connections: usize,
    request: usize,
    rate: Option<f64>,
    warmup: Duration,
    duration: Duration,
    timeout: Duration,
}

fn run_rr_thread(config: RrThread, progress: &Progress) -> anyhow::Result<Outcome> {
    let mut sessions = session::Sessions::new(config.hello, config.request)?;
    sessions.open(config.target, config.connections, config.timeout, progress)?;
    progress.operations.store(0, Ordering::Relaxed);
    sessions.request_response(
        config.rate,
        config.warmup,
        config.duration,
        config.timeout,
        progress,
    )?;
    sessions.close_all();
    Ok(std::mem::replace(&mut sessions.outcome, Outcome::new()))
}

/// The `index`-th of `parts` near-equal shares of `total`.
fn share(total: usize, parts: usize, index: usize) -> usize {
    total / parts + usize::from(index < total % parts)
}

fn parameters(
    common: &Common,
    hello: &[u8],
    specific: serde_json::Value,
) -> BTreeMap<String, serde_json::Value> {
    let mut map: BTreeMap<String, serde_json::Value> = match specific {
        serde_json::Value::Object(object) => object.into_iter().collect(),
        _ => BTreeMap::new(),
    };
    map.insert("hello_bytes".into(), json!(hello.len()));
    map.insert("hello_sni".into(), json!(hello::server_name(hello)));
    map.insert("threads".into(), json!(common.threads));
    map.insert("warmup_s".into(), json!(common.warmup.as_secs_f64()));
    map.insert("pids".into(), json!(common.pid));
    map
}

/// Runs one thread per config and merges their outcomes.
fn run_threads<C: Send + 'static>(
    configs: Vec<C>,
    progress: &Arc<Progress>,
    body: fn(C, &Progress) -> anyhow::Result<Outcome>,
) -> anyhow::Result<Outcome> {
    let handles: Vec<_> = configs
        .into_iter()
        .map(|config| {
            let progress = progress.clone();
            thread::spawn(move || body(config, &progress))
        })
        .collect();
    let mut merged = Outcome::new();
    for handle in handles {
        let outcome = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        merged.merge(outcome);
    }
    Ok(merged)
}

/// Wraps a load run with CPU snapshots, the progress line and the output.
fn measure(
    common: &Common,
    mode: &str,
    parameters: BTreeMap<String, serde_json::Value>,
    body: impl FnOnce(&Arc<Progress>) -> anyhow::Result<Outcome>,
) -> anyhow::Result<()> {
    let progress = Progress::shared();
    let show = common.progress || std::io::stderr().is_terminal();
    let reporter = show.then(|| {
        let progress = progress.clone();
        let mode = mode.to_owned();
        thread::spawn(move || progress_line(&mode, &progress))
    });
    let pids = procfs::with_descendants(&common.pid);
    // CPU is measured over the whole run; the warm-up share is small for the short runs used.
    let before = CpuSnapshot::take(&pids);
    let started = Instant::now();
    let result = body(&progress);
    let after = CpuSnapshot::take(&procfs::with_descendants(&common.pid));
    progress.done.store(true, Ordering::Relaxed);
    if let Some(handle) = reporter {
        let _ = handle.join();
    }
    let mut outcome = result?;
    let mut cpu = CpuUsage::between(&before, &after, !common.pid.is_empty());
    // Scale run-wide CPU to the measurement window so "per operation" divides like by like.
    let run = started.elapsed().as_secs_f64();
    let window = outcome.window.as_secs_f64();
    if mode != "idle" && run > 0.0 && window > 0.0 && window < run {
        let scale = window / run;
        cpu.proxy_seconds = cpu.proxy_seconds.map(|s| s * scale);
        cpu.system_seconds *= scale;
        cpu.client_seconds *= scale;
    }
    if mode == "idle" {
        outcome.window = Duration::from_secs_f64(run);
    }
    let labels = common.labels.iter().cloned().collect();
    let report = Report::new(
        mode,
        common.target.to_string(),
        labels,
        parameters,
        outcome,
        cpu,
    );
    if common.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn progress_line(mode: &str, progress: &Progress) {
    let start = Instant::now();
    let mut last = 0;
    while !progress.done.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(250));
        let elapsed = start.elapsed().as_secs();
        if elapsed == last {
            continue;
        }
        last = elapsed;
        let megabytes = progress.bytes.load(Ordering::Relaxed) as f64 / 1e6;
        eprint!(
            "\r[{mode}] {elapsed:>4}s  ops {:>10}  errors {:>6}  MB {megabytes:>10.1}",
            progress.operations.load(Ordering::Relaxed),
            progress.errors.load(Ordering::Relaxed),
        );
    }
    if last > 0 {
        eprintln!();
    }
}

fn run_backend(
    listen: SocketAddr,
    mode: backend::Mode,
    threads: usize,
    duration: Option<Duration>,
) -> anyhow::Result<()> {
    let (listeners, bound) = backend::bind(listen, threads)?;
    println!("listening on {bound}");
    std::io::stdout().flush()?;
    let stop_at = duration.map(|d| Instant::now() + d);
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|listener| thread::spawn(move || backend::serve(listener, mode, stop_at)))
        .collect();
    for handle in handles {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("a backend thread panicked"))??;
    }
    Ok(())
}
