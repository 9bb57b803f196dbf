//! The benchmark's reports: text for people, one JSON object for scripts (scripts/bench-all
//! and scripts/load-test parse it), CSV of every sample. Formats are kept stable.

use std::fmt::Write;

use crate::bench::{self, Arrivals, FloorSummary, Floors, ForkRun, ForkSample, LoadPoint, Sample, Summary};

/// A cold-boot run: one VM booted per request.
#[derive(Debug)]
pub struct ColdReport {
    /// The guest: a built-in name or an ELF path.
    pub function: String,
    pub mem_mib: u64,
    pub requests: usize,
    pub latency: Summary,
    pub boot_to_ready: Summary,
    pub request: Summary,
    pub teardown: Summary,
    pub floor_fresh: Summary,
    pub boot_exits: Summary,
    pub request_exits: Summary,
    pub throughput_rps: f64,
    pub wall_seconds: f64,
}

impl ColdReport {
    pub fn new(function: String, mem_mib: u64, samples: &[Sample], wall_seconds: f64) -> Self {
        let col = |f: fn(&Sample) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<f64>>());
        // Floor cycles interleave with requests; throughput counts the requests' own time only.
        let request_time: f64 = samples.iter().map(|s| s.latency_us + s.teardown_us).sum::<f64>() / 1e6;
        ColdReport {
            function,
            mem_mib,
            requests: samples.len(),
            latency: col(|s| s.latency_us),
            boot_to_ready: col(|s| s.boot_to_ready_us),
            request: col(|s| s.request_us),
            teardown: col(|s| s.teardown_us),
            floor_fresh: col(|s| s.floor_fresh_us),
            boot_exits: col(|s| s.boot_exits as f64),
            request_exits: col(|s| s.request_exits as f64),
            throughput_rps: samples.len() as f64 / request_time,
            wall_seconds,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let (latency, floor) = (&self.latency, &self.floor_fresh);
        serde_json::json!({
            "mode": "cold",
            "function": self.function,
            "mem_mib": self.mem_mib,
            "requests": self.requests,
            "concurrency": 1,
            "p50_us": latency.p50, "p90_us": latency.p90, "p99_us": latency.p99, "max_us": latency.max,
            "throughput_rps": self.throughput_rps,
            "boot_to_ready_p50_us": self.boot_to_ready.p50, "boot_to_ready_p90_us": self.boot_to_ready.p90,
            "request_p50_us": self.request.p50, "request_p90_us": self.request.p90,
            "teardown_p50_us": self.teardown.p50,
            "boot_exits_p50": self.boot_exits.p50, "request_exits_p50": self.request_exits.p50,
            "floor_fresh_p50_us": floor.p50, "floor_fresh_p90_us": floor.p90,
            "ratio_p50_to_floor_fresh": latency.p50 / floor.p50,
            "wall_seconds": self.wall_seconds,
        })
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let row = |out: &mut String, name: &str, s: &Summary| summary_row(out, 20, name, s);
        let _ = writeln!(out, "mode cold, {} requests, concurrency 1, {} MiB", self.requests, self.mem_mib);
        row(&mut out, "latency", &self.latency);
        row(&mut out, "  boot-to-ready", &self.boot_to_ready);
        row(&mut out, "  request", &self.request);
        row(&mut out, "teardown", &self.teardown);
        row(&mut out, "floor_fresh", &self.floor_fresh);
        let _ = writeln!(
            out,
            "  exits per VM: boot p50 {:.0}, request p50 {:.0}",
            self.boot_exits.p50, self.request_exits.p50
        );
        let _ = writeln!(out, "  throughput {:.1} requests/s (one at a time, teardown included)", self.throughput_rps);
        let _ = writeln!(out, "  latency p50 / floor_fresh p50 = {:.2}", self.latency.p50 / self.floor_fresh.p50);
        out
    }
}

/// What a fork-engine run measured besides its samples.
#[derive(Debug)]
pub struct ForkSetup {
    /// The mode's name: fresh, pool or reuse.
    pub mode: String,
    pub concurrency: usize,
    pub mem_mib: u64,
    /// Private memory of one forked VM, if /proc/self/smaps tells.
    pub private_kib: Option<u64>,
    pub floors: Floors,
    /// Set in pool mode only.
    pub pool_size: Option<usize>,
    pub restore_ioctls_per_vcpu: usize,
    /// Worker processes serving the requests; 0 for the engine in the benchmark's process.
    pub workers: usize,
    /// Pool mode: what the full pool costs the host per VM.
    pub density: Option<Density>,
    /// With worker processes: how long they took to start and fill their pools, ms.
    pub workers_ready_ms: Option<f64>,
    /// Pool mode in this process: VMs per second the builders made filling the pool at the
    /// start (restore and warm-up, nothing else running), and the process's CPU µs per VM.
    pub pool_fill_rate: Option<(f64, Option<f64>)>,
}

/// What a full pool costs the host, per VM, KiB: measured across starting the engine (or the
/// workers) and filling the pool, so other activity on the machine in that time counts too.
#[derive(Debug, Clone, Copy)]
pub struct Density {
    pub vms: usize,
    /// The drop of `MemAvailable`.
    pub available_kib_per_vm: f64,
    /// The growth of the kernel's allocations: slab, page tables, kernel stacks, vmalloc, per-CPU.
    pub kernel_kib_per_vm: f64,
    /// The private memory of the processes holding the VMs (the workers, or this process's
    /// growth): the VMs' copied pages, their page tables' user side, the engines' own memory.
    pub user_private_kib_per_vm: f64,
}

impl Density {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "vms": self.vms,
            "mem_available_drop_kib_per_vm": self.available_kib_per_vm,
            "kernel_kib_per_vm": self.kernel_kib_per_vm,
            "user_private_kib_per_vm": self.user_private_kib_per_vm,
        })
    }
}

/// A run on the fork engine (fresh, pool or reuse).
#[derive(Debug)]
pub struct ForkReport {
    pub setup: ForkSetup,
    pub requests: usize,
    pub latency: Summary,
    pub fork: Summary,
    pub run: Summary,
    pub throughput_rps: f64,
}

impl ForkReport {
    pub fn new(setup: ForkSetup, run: &ForkRun) -> Self {
        let col = |f: fn(&ForkSample) -> f64| Summary::of(&run.samples.iter().map(f).collect::<Vec<f64>>());
        ForkReport {
            setup,
            requests: run.samples.len(),
            latency: col(|s| s.latency_us),
            fork: col(|s| s.fork_us),
            run: col(|s| s.run_us),
            throughput_rps: run.samples.len() as f64 / run.wall.as_secs_f64(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let (setup, latency, floors) = (&self.setup, &self.latency, &self.setup.floors);
        let (floor_name, floor) = floors.of_mode(&setup.mode);
        serde_json::json!({
            "mode": setup.mode,
            "requests": self.requests,
            "concurrency": setup.concurrency,
            "mem_mib": setup.mem_mib,
            "p50_us": latency.p50, "p90_us": latency.p90, "p99_us": latency.p99, "max_us": latency.max,
            "throughput_rps": self.throughput_rps,
            "private_kib_per_vm": setup.private_kib,
            "fork_p50_us": self.fork.p50, "run_p50_us": self.run.p50,
            "floor_fresh_p50_us": floors.fresh.latency.p50,
            "floor_pool_p50_us": floors.pool.latency.p50,
            "floor_reuse_p50_us": floors.reuse.latency.p50,
            "ratio_p50_to_floor_fresh": latency.p50 / floors.fresh.latency.p50,
            "ratio_p50_to_floor_pool": latency.p50 / floors.pool.latency.p50,
            "ratio_p50_to_floor_reuse": latency.p50 / floors.reuse.latency.p50,
            "floor": floor_name,
            "ratio_p50_to_floor": latency.p50 / floor.latency.p50,
            "floors": floors_json(floors),
            "pool_size": setup.pool_size,
            "restore_ioctls_per_vcpu": setup.restore_ioctls_per_vcpu,
            "workers": setup.workers,
            "workers_ready_ms": setup.workers_ready_ms,
            "pool_fill_vms_per_s": setup.pool_fill_rate.map(|r| r.0),
            "pool_fill_cpu_us_per_vm": setup.pool_fill_rate.and_then(|r| r.1),
            "memory_per_vm": setup.density.map(|d| d.json()),
        })
    }

    pub fn text(&self) -> String {
        let (setup, floors) = (&self.setup, &self.setup.floors);
        let mut out = String::new();
        let row = |out: &mut String, name: &str, s: &Summary| summary_row(out, 14, name, s);
        let _ = writeln!(
            out,
            "mode {}, {} requests, concurrency {}, {} MiB image{}",
            setup.mode,
            self.requests,
            setup.concurrency,
            setup.mem_mib,
            workers_text(setup.workers)
        );
        row(&mut out, "latency", &self.latency);
        row(&mut out, "  fork", &self.fork);
        row(&mut out, "  run", &self.run);
        row(&mut out, "floor_fresh", &floors.fresh.latency);
        row(&mut out, "floor_pool", &floors.pool.latency);
        row(&mut out, "floor_reuse", &floors.reuse.latency);
        floor_steps_text(&mut out, floors);
        let _ = writeln!(out, "  throughput {:.0} requests/s", self.throughput_rps);
        if let Some(ms) = setup.workers_ready_ms {
            let _ = writeln!(out, "  {} worker processes ready (pools full) in {ms:.0} ms", setup.workers);
        }
        if let Some(d) = setup.density {
            let _ = writeln!(
                out,
                "  memory per pooled VM ({} VMs): MemAvailable drop {:.0} KiB, kernel {:+.0} KiB, user private {:.0} KiB",
                d.vms, d.available_kib_per_vm, d.kernel_kib_per_vm, d.user_private_kib_per_vm
            );
        }
        if let Some((rate, cpu)) = setup.pool_fill_rate {
            let cpu = cpu.map_or_else(String::new, |us| format!(", {us:.0} us of CPU per VM"));
            let _ = writeln!(out, "  pool filled at {rate:.0} VMs/s{cpu}");
        }
        let _ = match setup.private_kib {
            Some(kib) => writeln!(out, "  private memory per VM {kib} KiB"),
            None => writeln!(out, "  private memory per VM: unknown (no /proc/self/smaps)"),
        };
        let (floor_name, floor) = floors.of_mode(&setup.mode);
        let _ = writeln!(
            out,
            "  latency p50 / {floor_name} p50 = {:.2} (this mode's floor); / floor_fresh {:.2}, / floor_pool {:.2}, / floor_reuse {:.2}",
            self.latency.p50 / floor.latency.p50,
            self.latency.p50 / floors.fresh.latency.p50,
            self.latency.p50 / floors.pool.latency.p50,
            self.latency.p50 / floors.reuse.latency.p50
        );
        out
    }
}

/// The floors as JSON: each one's percentiles and the p50 of each of its steps, µs.
pub fn floors_json(floors: &Floors) -> serde_json::Value {
    let one = |f: &FloorSummary| {
        let steps: serde_json::Map<String, serde_json::Value> =
            f.steps.iter().map(|&(name, us)| (name.to_string(), serde_json::json!(us))).collect();
        serde_json::json!({
            "p50_us": f.latency.p50, "p90_us": f.latency.p90, "p99_us": f.latency.p99,
            "steps_p50_us": steps,
        })
    };
    serde_json::json!({
        "fresh": one(&floors.fresh),
        "pool": one(&floors.pool),
        "reuse": one(&floors.reuse),
        "memory_file": floors.backing,
    })
}

/// One line per floor with the p50 of each of its steps.
fn floor_steps_text(out: &mut String, floors: &Floors) {
    for (name, floor) in [("fresh", &floors.fresh), ("pool", &floors.pool), ("reuse", &floors.reuse)] {
        let steps: Vec<String> = floor.steps.iter().map(|(step, us)| format!("{step} {us:.1}")).collect();
        let _ = writeln!(out, "  floor_{name} steps p50 us: {}", steps.join(", "));
    }
}

/// An open-loop run: requests offered at one or more fixed rates (`mu2 bench --rate`).
#[derive(Debug)]
pub struct OpenReport {
    pub setup: ForkSetup,
    pub arrivals: Arrivals,
    pub seed: u64,
    pub requests_per_rate: usize,
    /// In increasing rate.
    pub points: Vec<LoadPoint>,
}

impl OpenReport {
    /// The knee: the lowest rate whose p99 left its low-load value (see `bench::knee`).
    pub fn knee(&self) -> Option<f64> {
        bench::knee(&self.points)
    }

    pub fn json(&self) -> serde_json::Value {
        let (setup, floors) = (&self.setup, &self.setup.floors);
        let (floor_name, floor) = floors.of_mode(&setup.mode);
        let rates: Vec<serde_json::Value> = self
            .points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "rate_rps": p.rate,
                    "requests": p.requests,
                    "throughput_rps": p.throughput,
                    "p50_us": p.latency.p50, "p90_us": p.latency.p90, "p99_us": p.latency.p99,
                    "p999_us": p.latency.p999, "max_us": p.latency.max,
                    "lag_p50_us": p.lag.p50, "lag_p99_us": p.lag.p99,
                    "fork_p50_us": p.fork_p50, "run_p50_us": p.run_p50,
                    "ratio_p50_to_floor": p.latency.p50 / floor.latency.p50,
                })
            })
            .collect();
        serde_json::json!({
            "mode": setup.mode,
            "load": "open",
            "arrivals": self.arrivals.name(),
            "seed": self.seed,
            "concurrency": setup.concurrency,
            "mem_mib": setup.mem_mib,
            "pool_size": setup.pool_size,
            "requests_per_rate": self.requests_per_rate,
            "private_kib_per_vm": setup.private_kib,
            "rates": rates,
            "knee": {
                "rate_rps": self.knee(),
                "low_load_p99_us": self.points.first().map(|p| p.latency.p99),
                "factor": bench::KNEE_FACTOR,
            },
            "floor": floor_name,
            "floors": floors_json(floors),
            "restore_ioctls_per_vcpu": setup.restore_ioctls_per_vcpu,
            "workers": setup.workers,
            "workers_ready_ms": setup.workers_ready_ms,
            "pool_fill_vms_per_s": setup.pool_fill_rate.map(|r| r.0),
            "pool_fill_cpu_us_per_vm": setup.pool_fill_rate.and_then(|r| r.1),
            "memory_per_vm": setup.density.map(|d| d.json()),
        })
    }

    pub fn text(&self) -> String {
        let (setup, floors) = (&self.setup, &self.setup.floors);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "mode {}, open loop ({} arrivals, seed {}), {} requests per rate, {} served at once, {} MiB image{}",
            setup.mode,
            self.arrivals.name(),
            self.seed,
            self.requests_per_rate,
            setup.concurrency,
            setup.mem_mib,
            workers_text(setup.workers)
        );
        let _ = writeln!(
            out,
            "  {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "rate/s", "served/s", "p50", "p90", "p99", "p99.9", "max", "lag p50", "lag p99", "run p50"
        );
        for p in &self.points {
            let _ = writeln!(
                out,
                "  {:>9.0} {:>9.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                p.rate,
                p.throughput,
                p.latency.p50,
                p.latency.p90,
                p.latency.p99,
                p.latency.p999,
                p.latency.max,
                p.lag.p50,
                p.lag.p99,
                p.run_p50
            );
        }
        let _ = writeln!(out, "  (us; latency from when each request was due, queueing included; lag: due to begun)");
        let row = |out: &mut String, name: &str, s: &Summary| summary_row(out, 14, name, s);
        row(&mut out, "floor_fresh", &floors.fresh.latency);
        row(&mut out, "floor_pool", &floors.pool.latency);
        row(&mut out, "floor_reuse", &floors.reuse.latency);
        floor_steps_text(&mut out, floors);
        let low = self.points.first().map_or(f64::NAN, |p| p.latency.p99);
        let _ = match self.knee() {
            Some(rate) => writeln!(
                out,
                "  knee at {rate:.0} requests/s: p99 above {:.0} x its low-load value ({low:.1} us)",
                bench::KNEE_FACTOR
            ),
            None if self.points.len() > 1 => writeln!(
                out,
                "  no knee: p99 stays within {:.0} x its low-load value ({low:.1} us) at every rate",
                bench::KNEE_FACTOR
            ),
            None => Ok(()),
        };
        out
    }
}

/// ", 2 worker processes", or nothing for the engine in the benchmark's process.
fn workers_text(workers: usize) -> String {
    match workers {
        0 => String::new(),
        1 => ", 1 worker process".into(),
        n => format!(", {n} worker processes"),
    }
}

/// One line of percentiles, the name padded to `width`.
fn summary_row(out: &mut String, width: usize, name: &str, s: &Summary) {
    let _ = writeln!(
        out,
        "  {name:<width$} p50 {:>9.1}  p90 {:>9.1}  p99 {:>9.1}  max {:>9.1}  us",
        s.p50, s.p90, s.p99, s.max
    );
}

/// The columns of `mu2 bench --csv`. The file starts with `# mu2 bench key=value …` (the
/// run's parameters), then this header, then one row per sample: `series` is `request` or the
/// floor it belongs to (`floor_fresh`, `floor_reuse`), `index` its place in its series (the
/// order requests completed in), `latency_us` the whole request or floor cycle; `fork_us` and
/// `run_us` (fork modes) or `boot_us`, `run_us` and `teardown_us` (cold mode) are its phases,
/// empty where they do not apply. docs/PERFORMANCE.md documents the same.
pub const CSV_HEADER: &str = "series,index,latency_us,fork_us,run_us,boot_us,teardown_us";

/// One sample as a CSV row.
#[derive(Debug, Clone, Copy, Default)]
pub struct CsvRow {
    pub series: &'static str,
    pub latency_us: f64,
    pub fork_us: Option<f64>,
    pub run_us: Option<f64>,
    pub boot_us: Option<f64>,
    pub teardown_us: Option<f64>,
}

impl CsvRow {
    pub fn request(latency_us: f64) -> CsvRow {
        CsvRow { series: "request", latency_us, ..CsvRow::default() }
    }

    pub fn floor(series: &'static str, latency_us: f64) -> CsvRow {
        CsvRow { series, latency_us, ..CsvRow::default() }
    }
}

/// A run's samples as CSV: its parameters, the header, the rows (see [`CSV_HEADER`]).
pub fn samples_csv(params: &[(String, String)], rows: &[CsvRow]) -> String {
    let mut text = String::from("# mu2 bench");
    for (key, value) in params {
        let _ = write!(text, " {key}={value}");
    }
    let _ = writeln!(text, "\n{CSV_HEADER}");
    let mut counts: Vec<(&str, usize)> = Vec::new();
    let field = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.1}"));
    for row in rows {
        let index = match counts.iter_mut().find(|(s, _)| *s == row.series) {
            Some((_, n)) => {
                *n += 1;
                *n - 1
            }
            None => {
                counts.push((row.series, 1));
                0
            }
        };
        let _ = writeln!(
            text,
            "{},{index},{:.1},{},{},{},{}",
            row.series,
            row.latency_us,
            field(row.fork_us),
            field(row.run_us),
            field(row.boot_us),
            field(row.teardown_us)
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(base: f64) -> Summary {
        Summary { p50: base, p90: base + 1.0, p99: base + 2.0, max: base + 3.0 }
    }

    fn floor(base: f64, steps: &[(&'static str, f64)]) -> FloorSummary {
        FloorSummary { latency: summary(base), steps: steps.to_vec() }
    }

    #[test]
    fn fork_text_keeps_its_layout() {
        let setup = ForkSetup {
            mode: "pool".into(),
            concurrency: 2,
            mem_mib: 64,
            private_kib: Some(32),
            floors: Floors {
                fresh: floor(50.0, &[("create_vm", 20.0), ("first_run", 30.0)]),
                pool: floor(20.0, &[("first_run", 20.0), ("teardown", 200.0)]),
                reuse: floor(25.0, &[("registers", 5.0), ("first_run", 25.0)]),
                backing: "/tmp/img".into(),
            },
            pool_size: Some(16),
            restore_ioctls_per_vcpu: 5,
            workers: 0,
            pool_fill_rate: None,
            density: None,
            workers_ready_ms: None,
        };
        let report = ForkReport {
            setup,
            requests: 20,
            latency: summary(100.0),
            fork: summary(40.0),
            run: summary(60.0),
            throughput_rps: 1234.4,
        };
        let expected = "mode pool, 20 requests, concurrency 2, 64 MiB image\n\
            \x20 latency        p50     100.0  p90     101.0  p99     102.0  max     103.0  us\n\
            \x20   fork         p50      40.0  p90      41.0  p99      42.0  max      43.0  us\n\
            \x20   run          p50      60.0  p90      61.0  p99      62.0  max      63.0  us\n\
            \x20 floor_fresh    p50      50.0  p90      51.0  p99      52.0  max      53.0  us\n\
            \x20 floor_pool     p50      20.0  p90      21.0  p99      22.0  max      23.0  us\n\
            \x20 floor_reuse    p50      25.0  p90      26.0  p99      27.0  max      28.0  us\n\
            \x20 floor_fresh steps p50 us: create_vm 20.0, first_run 30.0\n\
            \x20 floor_pool steps p50 us: first_run 20.0, teardown 200.0\n\
            \x20 floor_reuse steps p50 us: registers 5.0, first_run 25.0\n\
            \x20 throughput 1234 requests/s\n\
            \x20 private memory per VM 32 KiB\n\
            \x20 latency p50 / floor_pool p50 = 5.00 (this mode's floor); / floor_fresh 2.00, / floor_pool 5.00, / floor_reuse 4.00\n";
        assert_eq!(report.text(), expected);
        let json = report.json();
        assert_eq!(json["pool_size"], 16);
        assert_eq!(json["ratio_p50_to_floor_reuse"], 4.0);
        assert_eq!((json["floor"].as_str(), json["ratio_p50_to_floor"].as_f64()), (Some("floor_pool"), Some(5.0)));
        assert_eq!(json["floors"]["fresh"]["steps_p50_us"]["create_vm"], 20.0);
        assert_eq!(json["floors"]["memory_file"], "/tmp/img");
    }

    #[test]
    fn cold_throughput_counts_request_time_only() {
        let sample = Sample { latency_us: 900.0, teardown_us: 100.0, ..Sample::default() };
        let report = ColdReport::new("echo".into(), 64, &[sample, sample], 10.0);
        assert_eq!(report.throughput_rps, 1000.0);
        assert!(report.text().starts_with("mode cold, 2 requests, concurrency 1, 64 MiB\n"));
        assert_eq!(report.json()["function"], "echo");
    }

    #[test]
    fn csv_has_the_parameters_a_header_and_a_row_per_sample_numbered_per_series() {
        let rows = [
            CsvRow { fork_us: Some(1.5), run_us: Some(2.0), ..CsvRow::request(3.5) },
            CsvRow::request(4.0),
            CsvRow::floor("floor_fresh", 800.0),
        ];
        let params = [("mode".to_string(), "fresh".to_string()), ("concurrency".to_string(), "1".to_string())];
        assert_eq!(
            samples_csv(&params, &rows),
            format!(
                "# mu2 bench mode=fresh concurrency=1\n{CSV_HEADER}\n\
                 request,0,3.5,1.5,2.0,,\nrequest,1,4.0,,,,\nfloor_fresh,0,800.0,,,,\n"
            )
        );
    }
}
