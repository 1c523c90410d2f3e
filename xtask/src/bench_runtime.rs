//! The runtime part of `cargo xtask bench`: cold start and warm overhead of
//! the function and FPM runtimes, run from the built x86_64 layers against
//! the Runtime API test server, in the acceptance tests' isolated roots.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use layer_tests::runtime_api::{Invocation, Outcome, RuntimeApi};
use layer_tests::sandbox::Options;
use layer_tests::{Layer, LayerRoot, Manifest};

/// Invocations measured per runtime, after the warm-up ones.
const INVOCATIONS: usize = 1000;
const WARM_UP: usize = 50;
/// Cold starts measured per runtime.
const COLD_STARTS: usize = 10;
const WAIT: Duration = Duration::from_secs(60);

/// The handler of the function runtime benchmark: it returns at once.
const FUNCTION_HANDLER: &str = "<?php\nreturn fn ($event, $context) => 'ok';\n";
/// The script of the FPM runtime benchmark: it responds at once.
const FPM_SCRIPT: &str = "<?php\necho 'ok';\n";

/// Figures of one runtime.
pub struct RuntimeFigures {
    pub layer: String,
    pub cold_start_median: Duration,
    pub warm_median: Duration,
    pub warm_p99: Duration,
    pub invocations: usize,
}

/// Measures the function and FPM runtimes of the x86_64 layers in
/// `manifest`. The environment must name the build roots and test shells,
/// as `cargo xtask test` sets it.
pub fn measure(manifest_path: &Path) -> Result<Vec<RuntimeFigures>> {
    let manifest: Manifest = serde_json::from_str(&fs::read_to_string(manifest_path)?)
        .with_context(|| format!("invalid {}", manifest_path.display()))?;
    let event = fs::read(crate::project_root().join("tests/events/http-api.json"))?;
    let mut figures = Vec::new();
    for (kind, handler, file, payload) in [
        ("function", FUNCTION_HANDLER, "handler.php", b"{}".to_vec()),
        ("fpm", FPM_SCRIPT, "index.php", event),
    ] {
        let layer = manifest
            .layers
            .iter()
            .find(|layer| layer.kind == kind && layer.architecture == "x86_64")
            .with_context(|| format!("{} lists no x86_64 {kind} layer", manifest_path.display()))?;
        eprintln!(
            "bench: {} runtime ({}): {COLD_STARTS} cold starts, {INVOCATIONS} invocations",
            kind, layer.name
        );
        figures.push(measure_layer(layer, handler, file, &payload)?);
    }
    Ok(figures)
}

fn measure_layer(layer: &Layer, handler: &str, file: &str, payload: &[u8]) -> Result<RuntimeFigures> {
    let root = LayerRoot::new(layer)?;
    root.add_task_file(file, handler.as_bytes());

    let mut cold = Vec::new();
    for _ in 0..COLD_STARTS {
        let api = RuntimeApi::start()?;
        let started = Instant::now();
        let runtime = root.spawn("/opt/bootstrap", &[], &options(&api, file))?;
        api.wait_polls(1, WAIT).with_context(|| {
            format!(
                "{}: the runtime did not ask for an event\n{}",
                layer.name,
                runtime.log()
            )
        })?;
        let first = api.first_poll().context("no first poll recorded")?;
        cold.push(first - started);
    }

    let api = RuntimeApi::start()?;
    let runtime = root.spawn("/opt/bootstrap", &[], &options(&api, file))?;
    let mut warm = Vec::new();
    for index in 0..WARM_UP + INVOCATIONS {
        let invocation = Invocation::new(payload.to_vec());
        let id = invocation.request_id.clone();
        match api.invoke(invocation, WAIT)? {
            Outcome::Response(_) => {}
            other => bail!("{}: invocation failed: {other:?}\n{}", layer.name, runtime.log()),
        }
        if index >= WARM_UP {
            warm.push(api.overhead(&id).context("no overhead recorded")?);
        }
    }
    api.assert_no_violations();
    cold.sort();
    warm.sort();
    Ok(RuntimeFigures {
        layer: layer.name.clone(),
        cold_start_median: percentile(&cold, 50),
        warm_median: percentile(&warm, 50),
        warm_p99: percentile(&warm, 99),
        invocations: warm.len(),
    })
}

fn options(api: &RuntimeApi, handler: &str) -> Options {
    Options::network()
        .env("AWS_LAMBDA_RUNTIME_API", &api.address())
        .env("_HANDLER", handler)
        .env("AWS_LAMBDA_FUNCTION_NAME", "bench")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
}

/// Returns the value below which `percent` % of the sorted `values` fall.
fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = (sorted.len() * percent).div_ceil(100).saturating_sub(1);
    sorted[index.min(sorted.len() - 1)]
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64() * 1000.0)
}

/// Renders the BENCHMARKS.md section of the runtime figures.
pub fn render(figures: &[RuntimeFigures]) -> String {
    let mut section = String::new();
    let _ = writeln!(section, "## Runtime overhead\n");
    let _ = writeln!(
        section,
        "The runtimes of the x86_64 layers, run by /opt/bootstrap in the acceptance\n\
         tests' isolated root against the Runtime API test server on 127.0.0.1.\n\
         Warm overhead: from the server handing out an event to the server having\n\
         read the whole response, for a handler that returns at once (function)\n\
         or a script that prints two bytes (FPM, an HTTP API event through\n\
         php-fpm). Cold start: from starting bwrap to the first `GET next`,\n\
         median of {COLD_STARTS}; it includes bwrap's own setup and, for FPM,\n\
         starting php-fpm. The target column is the warm median the runtimes\n\
         aim for on a machine like this one.\n"
    );
    let _ = writeln!(
        section,
        "| layer | invocations | warm median (ms) | warm p99 (ms) | target (ms) | cold start (ms) |"
    );
    let _ = writeln!(section, "|---|---:|---:|---:|---:|---:|");
    for figure in figures {
        let target = if figure.layer.ends_with("-fpm") { "3" } else { "1" };
        let _ = writeln!(
            section,
            "| {} | {} | {} | {} | < {target} | {} |",
            figure.layer,
            figure.invocations,
            milliseconds(figure.warm_median),
            milliseconds(figure.warm_p99),
            milliseconds(figure.cold_start_median)
        );
    }
    section
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_picks_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 50), Duration::from_millis(50));
        assert_eq!(percentile(&values, 99), Duration::from_millis(99));
        assert_eq!(percentile(&values[..1], 99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }

    #[test]
    fn render_lists_targets() {
        let figure = |layer: &str| RuntimeFigures {
            layer: layer.to_string(),
            cold_start_median: Duration::from_millis(40),
            warm_median: Duration::from_micros(350),
            warm_p99: Duration::from_micros(900),
            invocations: 1000,
        };
        let page = render(&[figure("php-82"), figure("php-82-fpm")]);
        assert!(
            page.contains("| php-82 | 1000 | 0.350 | 0.900 | < 1 | 40.000 |"),
            "{page}"
        );
        assert!(
            page.contains("| php-82-fpm | 1000 | 0.350 | 0.900 | < 3 | 40.000 |"),
            "{page}"
        );
    }
}
