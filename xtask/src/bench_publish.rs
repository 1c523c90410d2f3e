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
//! this warm-up, the first run at 100 ms took about 0.6 s longer here.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use base64::Engine as _;
use layer_tests::fault_proxy::FaultProxy;
use layer_tests::moto::Moto;
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
    pub layers: usize,
    pub regions: usize,
    pub first_requests: usize,
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
    moto.warm_up(regions.iter().map(String::as_str))?;
    eprintln!(
        "bench: publishing {layers} layers to {REGIONS} regions through a proxy adding {} ms per request",
        latency.as_millis()
    );

    let run = |label: &str| -> Result<Duration> {
        let started = Instant::now();
        let output = Command::new(std::env::current_exe()?)
            .arg("publish")
            .arg("--regions")
            .arg(regions.join(","))
            .arg("--concurrency")
            .arg(CONCURRENCY.to_string())
            .arg("--endpoint-url")
            .arg(proxy.endpoint())
            .arg("--out-dir")
            .arg(dist.path())
            .arg("--table")
            .arg(dist.path().join("layers.json"))
            // Test credentials for the emulator, and none of the user's
            // AWS configuration.
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("CI", "true")
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
    let first_requests = proxy.requests().len();
    proxy.clear_requests();
    let second_time = run("second")?;
    let second = proxy.requests();
    Ok(PublishFigures {
        latency,
        layers,
        regions: REGIONS,
        first_requests,
        first_time,
        second_requests: second.len(),
        second_reads: second.iter().filter(|record| record.is_read()).count(),
        second_time,
    })
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
        "`cargo xtask bench --only publish`: `cargo xtask publish` of {} layers of {} KiB to {} regions \
         ({pairs} pairs) against moto on 127.0.0.1, through the fault proxy adding a fixed latency to \
         every request, `--concurrency {CONCURRENCY}`. The second run has nothing to publish. Ideal \
         time: requests / concurrency x latency. Target: at most 1.2x the ideal, and at most one read \
         per layer and region when nothing changed.\n",
        first.layers,
        ZIP_BYTES / 1024,
        first.regions,
    );
    let _ = writeln!(
        page,
        "| latency | run | requests | per pair | reads | time | ideal | ratio | ratio to ideal + own time |"
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
                None,
                figures.first_time,
                own.map(|own| own.first_time),
            ),
            (
                "second",
                figures.second_requests,
                Some(figures.second_reads),
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
                "| {} ms | {label} | {requests} | {:.2} | {} | {:.2} s | {:.2} s | {} | {} |",
                figures.latency.as_millis(),
                requests as f64 / pairs as f64,
                reads.map_or("-".to_string(), |reads| reads.to_string()),
                time.as_secs_f64(),
                ideal.as_secs_f64(),
                ratio(ideal),
                own_time.map_or("-".to_string(), |own_time| ratio(ideal + own_time)),
            );
        }
    }
    let _ = writeln!(
        page,
        "\nBefore the timed runs, each region gets one uncounted read straight to moto, because moto \
         sets up a region on its first request to it (about 200 ms for the very first, 13 ms for each \
         further one), which AWS regions do not. Each time includes starting the task (reading the \
         manifest, hashing the zips, loading the credentials). The run without added latency gives the time moto and the task take of their \
         own on this machine's cores (moto's Python code runs under the global interpreter lock, so \
         its requests share one core), and the last column compares each run with its ideal plus \
         that time.\n"
    );
    page
}
