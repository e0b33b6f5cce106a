//! The connection decision's two pure steps in a loop, for instruction counts under
//! `valgrind --tool=callgrind` (see `perf/callgrind.sh`).
//!
//! ```text
//! hotpath [--iterations N] [--only WHAT] [--testdata DIR]
//!   WHAT: all (default) | parse:FILE.bin | lookup:exact | lookup:wildcard | lookup:miss
//! ```
//!
//! Each step runs N times over its inputs: every ClientHello capture in
//! `gateway-proto/testdata/clienthello/*.bin` through `clienthello::parse`, and route lookups in a
//! table of 1000 exact Consul-style names plus 20 wildcards (exact hits, wildcard hits and
//! misses). It prints what it did, so the work cannot be optimised away and a wrong capture
//! shows up. Running it with N and 2N and subtracting removes the fixed costs (process
//! start, reading files, building the table): the difference divided by N is the cost of one
//! pass, deterministic because callgrind counts instructions, not time.
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gateway_proto::clienthello::{self, Verdict};
use gateway_proto::routes::{Lookup, Pattern, RouteSpec, RouteTable};

/// The gateway's default cap on a buffered first flight (`limits.client_hello_max_bytes`).
const MAX_HELLO_BYTES: usize = 32 * 1024;
const EXACT_ROUTES: usize = 1000;
const WILDCARD_ROUTES: usize = 20;
const LOOKUPS_PER_KIND: usize = 100;
const TRUST_DOMAIN: &str = "11111111-2222-3333-4444-555555555555.consul";

struct Options {
    iterations: u64,
    only: String,
    testdata: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: hotpath [--iterations N] [--only all|parse:FILE.bin|lookup:exact|lookup:wildcard|lookup:miss] [--testdata DIR]"
    );
    std::process::exit(2);
}

fn options() -> Options {
    let mut options = Options {
        iterations: 1000,
        only: "all".to_owned(),
        testdata: Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/clienthello"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--iterations" => options.iterations = value.parse().unwrap_or_else(|_| usage()),
            "--only" => options.only = value,
            "--testdata" => options.testdata = PathBuf::from(value),
            _ => usage(),
        }
    }
    options
}

/// Every `*.bin` capture, sorted by name so runs are comparable.
fn captures(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .map(|path| {
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
            (name, bytes)
        })
        .collect();
    files.sort();
    files
}

fn parse_loop(name: &str, bytes: &[u8], iterations: u64) {
    let (mut done, mut need_more, mut rejected, mut name_bytes) = (0u64, 0u64, 0u64, 0usize);
    for _ in 0..iterations {
        match clienthello::parse(black_box(bytes), MAX_HELLO_BYTES) {
            Verdict::Done(hello) => {
                done += 1;
                name_bytes += hello.server_name.map_or(0, |sni| sni.as_str().len());
            }
            Verdict::NeedMore => need_more += 1,
            Verdict::Reject(_) => rejected += 1,
        }
    }
    println!(
        "parse {name}: {} bytes, {iterations} iterations: done {done} need_more {need_more} reject {rejected} (sni bytes {name_bytes})",
        bytes.len()
    );
}

fn service(i: usize) -> String {
    format!(
        "svc-{i:04}.ns-{}.dc{}.internal.{TRUST_DOMAIN}",
        i % 7,
        1 + i % 3
    )
}

fn table() -> RouteTable {
    let endpoint: SocketAddr = "127.0.0.1:21000".parse().expect("a valid address");
    let exact = (0..EXACT_ROUTES).map(service);
    let wildcard = (0..WILDCARD_ROUTES).map(|i| format!("*.wild-dc{i}.internal.{TRUST_DOMAIN}"));
    let routes = exact
        .chain(wildcard)
        .map(|sni| RouteSpec {
            pattern: Pattern::parse(&sni).expect("a valid pattern"),
            endpoints: vec![endpoint],
        })
        .collect();
    RouteTable::build(routes, None).expect("no duplicate routes")
}

/// Names to look up, normalised as the parser hands them over (lowercase, no trailing dot).
fn names(kind: &str) -> Vec<String> {
    (0..LOOKUPS_PER_KIND)
        .map(|i| match kind {
            // Spread over the table.
            "exact" => service(i * (EXACT_ROUTES / LOOKUPS_PER_KIND) + 3),
            // A Consul name under a wildcard: the exact probe misses, then the suffixes are tried.
            "wildcard" => format!(
                "svc-{i:04}.default.wild-dc{}.internal.{TRUST_DOMAIN}",
                i % WILDCARD_ROUTES
            ),
            // An unrouted Consul name: the exact probe and every suffix miss.
            "miss" => format!("svc-{i:04}.default.dc9.internal.{TRUST_DOMAIN}"),
            _ => usage(),
        })
        .collect()
}

fn lookup_loop(table: &RouteTable, kind: &str, iterations: u64) {
    let names = names(kind);
    let (mut matched, mut no_route, mut index_sum) = (0u64, 0u64, 0usize);
    for _ in 0..iterations {
        for name in &names {
            match table.lookup(black_box(Some(name.as_str()))) {
                Lookup::Matched(index) => {
                    matched += 1;
                    index_sum = index_sum.wrapping_add(index);
                }
                Lookup::NoRoute => no_route += 1,
            }
        }
    }
    let expected_hit = kind != "miss";
    if (matched > 0) != expected_hit || (no_route > 0) == expected_hit {
        panic!("lookup:{kind}: matched {matched}, no route {no_route}: the table is not what this benchmark assumes");
    }
    println!(
        "lookup {kind}: {} names x {iterations} iterations = {} lookups: matched {matched} no_route {no_route} (index sum {index_sum})",
        names.len(),
        names.len() as u64 * iterations
    );
}

fn main() {
    let options = options();
    let only = options.only.as_str();
    if only == "all" || only.starts_with("parse:") {
        let files = captures(&options.testdata);
        if files.is_empty() {
            panic!("no *.bin captures in {}", options.testdata.display());
        }
        let wanted = only.strip_prefix("parse:");
        let mut ran = false;
        for (name, bytes) in &files {
            if wanted.is_none_or(|wanted| wanted == name) {
                parse_loop(name, bytes, options.iterations);
                ran = true;
            }
        }
        if !ran {
            panic!(
                "no capture named {only:?} in {}",
                options.testdata.display()
            );
        }
    }
    if only == "all" || only.starts_with("lookup:") {
        let table = table();
        println!(
            "route table: {} exact + {} wildcard routes",
            EXACT_ROUTES, WILDCARD_ROUTES
        );
        let kinds: Vec<&str> = match only.strip_prefix("lookup:") {
            Some(kind) => vec![kind],
            None => vec!["exact", "wildcard", "miss"],
        };
        for kind in kinds {
            lookup_loop(&table, kind, options.iterations);
        }
    }
    if only != "all" && !only.starts_with("parse:") && !only.starts_with("lookup:") {
        usage();
    }
}
