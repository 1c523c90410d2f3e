//! The publish part of `cargo xtask bench`: `cargo xtask publish` of 4
//! layers to 30 regions against moto, through the fault proxy with a fixed
//! latency added to every request, then the same run again with nothing
//! to publish.
//!
//! The ideal time of a run is its request count divided by the concurrency,
//! times the latency: every slot busy from start to end. The ratio to it
//! shows how much the task's own scheduling and waiting cost.
//!
//! Before the runs, each region gets one read sent straight to moto, not
//! through the proxy and not counted. moto creates a region's backend on
//! the first request to it, a cost that AWS regions do not have. Without
//! this warm-up, the first run at 100 ms took about 0.6 s longer on a
//! 2-core machine.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use base64::Engine as _;
use layer_tests::fault_proxy::FaultProxy;
use layer_tests::moto::{aim_at_emulator, Moto};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Latencies the proxy adds to every request, one measurement each. With
/// none, the run takes moto's and the task's own time; AWS responses
/// take 100 ms and more from outside its regions.
const LATENCIES: [Duration; 3] = [Duration::ZERO, Duration::from_millis(100), Duration::from_millis(250)];
const CONCURRENCY: usize = 8;
const REGIONS: usize = 30;
/// Size of each synthetic zip. moto decodes and hashes every upload under
/// Python's global lock, so real zips would measure moto on this
/// machine's cores instead of the task's scheduling.
const ZIP_BYTES: usize = 32 * 1024;

/// Figures of the two runs at one latency.
pub struct PublishFigures {
    pub latency: Duration,
    /// Time of moto's first request, in the warm-up.
    pub warm_up_first: Duration,
    /// Mean time of the other warm-up requests, one per further region.
    pub warm_up_others: Duration,
    pub layers: usize,
    pub regions: usize,
    pub first_requests: usize,
    pub first_reads: usize,
    pub first_time: Duration,
    pub second_requests: usize,
    pub second_reads: usize,
    pub second_time: Duration,
}

impl PublishFigures {
    fn ideal(&self, requests: usize) -> Duration {
        self.latency.mul_f64(requests as f64 / CONCURRENCY as f64)
    }
}

/// Writes 4 synthetic layers and a manifest that records them as tested.
fn write_dist(dir: &Path) -> Result<usize> {
    let mut layers = Vec::new();
    for (name, architecture) in [
        ("php-82", "x86_64"),
        ("php-82-fpm", "x86_64"),
        ("arm-php-82", "arm64"),
        ("arm-php-82-fpm", "arm64"),
    ] {
        let bytes: Vec<u8> = format!("{name} ").bytes().cycle().take(ZIP_BYTES).collect();
        let zip = format!("{name}.zip");
        fs::write(dir.join(&zip), &bytes)?;
        let digest = Sha256::digest(&bytes);
        let sha256 = crate::sources::hex(&digest);
        layers.push(json!({
            "name": name, "kind": if name.ends_with("fpm") { "fpm" } else { "function" },
            "architecture": architecture, "php_version": "8.2.32",
            "description": format!("PHP 8.2.32 benchmark layer {name}"),
            "compatible_runtimes": ["provided.al2023"], "compatible_architectures": [architecture],
            "glibc_max": "2.34", "ld_library_path": "", "loader": "", "zip": zip,
            "sha256": sha256, "code_sha256": base64::engine::general_purpose::STANDARD.encode(digest),
            "zip_bytes": bytes.len(), "unzipped_bytes": bytes.len(),
            "modules": {"php": [], "zend": []}, "disabled_extensions": {}, "libraries": [],
            "acceptance": {"zip_sha256": sha256, "passed_at": "1970-01-01T00:00:00Z"},
        }));
    }
    let count = layers.len();
    fs::write(
        dir.join(crate::build_layers::MANIFEST_NAME),
        json!({ "layers": layers }).to_string(),
    )?;
    Ok(count)
}

/// Measures the two runs at each of [`LATENCIES`], each time against a
/// fresh moto whose regions were warmed up first (see [`Moto::warm_up`]).
pub fn measure(cache: &Path) -> Result<Vec<PublishFigures>> {
    LATENCIES.iter().map(|latency| measure_at(cache, *latency)).collect()
}

fn measure_at(cache: &Path, latency: Duration) -> Result<PublishFigures> {
    let moto = Moto::start(&crate::test::moto_server(cache)?)?;
    let proxy = FaultProxy::start(moto.address(), latency)?;
    let dist = tempfile::tempdir()?;
    let layers = write_dist(dist.path())?;
    let regions = super::publish::Regions::load(&crate::project_root().join("layers/regions.toml"))?;
    let regions: Vec<String> = regions
        .enabled
        .iter()
        .chain(&regions.opt_in)
        .take(REGIONS)
        .cloned()
        .collect();
    if regions.len() < REGIONS {
        bail!("layers/regions.toml lists fewer than {REGIONS} regions");
    }
    let warm_up = moto.warm_up(regions.iter().map(String::as_str))?;
    let warm_up_others = warm_up[1..].iter().sum::<Duration>() / (warm_up.len() - 1) as u32;
    eprintln!(
        "bench: warmed up moto's {REGIONS} regions: {:.0} ms for the first request, {:.0} ms per further region",
        warm_up[0].as_secs_f64() * 1000.0,
        warm_up_others.as_secs_f64() * 1000.0
    );
    eprintln!(
        "bench: publishing {layers} layers to {REGIONS} regions through the proxy, {} ms added per request",
        latency.as_millis()
    );

    let run = |label: &str| -> Result<Duration> {
        let started = Instant::now();
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("publish");
        aim_at_emulator(&mut command, &proxy.endpoint(), dist.path());
        // Dummy credentials: moto does not check them.
        let output = command
            .arg("--regions")
            .arg(regions.join(","))
            .arg("--concurrency")
            .arg(CONCURRENCY.to_string())
            .env("CI", "true")
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            .output()?;
        let elapsed = started.elapsed();
        if !output.status.success() {
            bail!(
                "the {label} publish run failed:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(elapsed)
    };

    let first_time = run("first")?;
    let first = proxy.requests();
    proxy.clear_requests();
    let second_time = run("second")?;
    let second = proxy.requests();
    let figures = PublishFigures {
        latency,
        warm_up_first: warm_up[0],
        warm_up_others,
        layers,
        regions: REGIONS,
        first_requests: first.len(),
        first_reads: first.iter().filter(|record| record.is_read()).count(),
        first_time,
        second_requests: second.len(),
        second_reads: second.iter().filter(|record| record.is_read()).count(),
        second_time,
    };
    for (label, requests, time) in [
        ("first", figures.first_requests, figures.first_time),
        ("second", figures.second_requests, figures.second_time),
    ] {
        let ideal = figures.ideal(requests);
        let ratio = if ideal.is_zero() {
            String::new()
        } else {
            format!(
                ", {:.2}x the ideal {:.2} s",
                time.as_secs_f64() / ideal.as_secs_f64(),
                ideal.as_secs_f64()
            )
        };
        eprintln!(
            "bench: {label} run: {requests} requests in {:.2} s{ratio}",
            time.as_secs_f64()
        );
    }
    Ok(figures)
}

pub fn render(all: &[PublishFigures]) -> String {
    let mut page = String::new();
    let Some(first) = all.first() else {
        return page;
    };
    let pairs = first.layers * first.regions;
    let _ = writeln!(page, "## Publishing\n");
    let _ = writeln!(
        page,
        "`cargo xtask bench --only publish`: `cargo xtask publish` of {} synthetic layers of {} KiB to \
         {} regions ({pairs} pairs) against moto on 127.0.0.1, through the fault proxy with no faults \
         injected and a fixed latency added to every request, `--concurrency {CONCURRENCY}`. The first \
         run publishes every pair with 3 requests: ListLayerVersions, PublishLayerVersion and \
         AddLayerVersionPermission. The second run has nothing to publish. Ideal time: (requests / \
         concurrency) x latency, every slot busy from start to end. Targets: a ratio (time / ideal) of \
         at most 1.2 at each added latency, and at most one read per layer and region in the second \
         run.\n",
        first.layers,
        ZIP_BYTES / 1024,
        first.regions,
    );
    let _ = writeln!(
        page,
        "| latency | run | requests | per pair | reads | time | ideal | ratio | time / (ideal + time at 0 ms) |"
    );
    let _ = writeln!(page, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    // The runs without added latency: the time moto and the task take of
    // their own, for the last column.
    let own = all.iter().find(|figures| figures.latency.is_zero());
    for figures in all {
        for (label, requests, reads, time, own_time) in [
            (
                "first",
                figures.first_requests,
                figures.first_reads,
                figures.first_time,
                own.map(|own| own.first_time),
            ),
            (
                "second",
                figures.second_requests,
                figures.second_reads,
                figures.second_time,
                own.map(|own| own.second_time),
            ),
        ] {
            let ideal = figures.ideal(requests);
            let ratio = |base: Duration| {
                if base.is_zero() || figures.latency.is_zero() {
                    "-".to_string()
                } else {
                    format!("{:.2}", time.as_secs_f64() / base.as_secs_f64())
                }
            };
            let _ = writeln!(
                page,
                "| {} ms | {label} | {requests} | {:.2} | {reads} | {:.2} s | {:.2} s | {} | {} |",
                figures.latency.as_millis(),
                requests as f64 / pairs as f64,
                time.as_secs_f64(),
                ideal.as_secs_f64(),
                ratio(ideal),
                own_time.map_or("-".to_string(), |own_time| ratio(ideal + own_time)),
            );
        }
    }
    let millis = |times: &mut dyn Iterator<Item = Duration>| {
        let times: Vec<f64> = times.map(|time| time.as_secs_f64() * 1000.0).collect();
        let low = times.iter().copied().fold(f64::INFINITY, f64::min);
        let high = times.iter().copied().fold(0.0, f64::max);
        if format!("{low:.0}") == format!("{high:.0}") {
            format!("{low:.0} ms")
        } else {
            format!("{low:.0} to {high:.0} ms")
        }
    };
    let _ = writeln!(
        page,
        "\nBefore the timed runs, each region gets one uncounted read sent straight to moto, because \
         moto sets up a region on its first request to it, which AWS regions do not. That took {} for \
         moto's first request and {} per further region (one moto per latency). Each time includes \
         starting the task (reading the manifest, hashing the zips, loading the credentials).\n",
        millis(&mut all.iter().map(|figures| figures.warm_up_first)),
        millis(&mut all.iter().map(|figures| figures.warm_up_others)),
    );
    let _ = writeln!(
        page,
        "The last column divides each time by its ideal plus the time of the same run without added \
         latency: moto's and the task's own work, with moto's Python code on one core under the global \
         interpreter lock. That work overlaps the added latency, so the sum is an upper bound and values \
         under 1 are expected.\n"
    );
    page
}
