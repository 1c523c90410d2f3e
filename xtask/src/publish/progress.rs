//! Progress display of `cargo xtask publish`: a bar per layer on a
//! terminal, a line per event elsewhere (CI logs, files, pipes).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::aws::{Failure, ATTEMPTS};
use super::{Counts, Outcome, PairReport};

pub struct Progress {
    live: Option<Live>,
}

struct Live {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    counts: Mutex<HashMap<String, LayerCounts>>,
}

/// Outcome counts of one layer over its regions so far, and its retries.
#[derive(Default)]
struct LayerCounts {
    outcomes: Counts,
    retries: usize,
}

impl LayerCounts {
    fn message(&self) -> String {
        let outcomes = &self.outcomes;
        let mut parts = Vec::new();
        for (count, label) in [
            (outcomes.published, "published"),
            (outcomes.up_to_date, "up to date"),
            (outcomes.made_public, "made public"),
            (outcomes.would_publish, "would publish"),
            (outcomes.would_make_public, "would make public"),
            (outcomes.failed, "failed"),
            (self.retries, "retries"),
        ] {
            if count > 0 {
                parts.push(format!("{count} {label}"));
            }
        }
        parts.join(", ")
    }
}

impl Progress {
    /// Creates a bar per layer when stderr is a terminal outside CI, or
    /// prints plain lines otherwise.
    pub fn new(layers: &[String], regions: usize) -> Progress {
        let terminal = std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
        if !terminal {
            return Progress { live: None };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let width = layers.iter().map(String::len).max().unwrap_or(0);
        let style = ProgressStyle::with_template(&format!(
            "{{prefix:{width}}} [{{bar:30}}] {{pos:>3}}/{{len}} regions {{elapsed:>4}} {{msg}}"
        ))
        .expect("the progress template is valid")
        .progress_chars("=> ");
        let mut bars = HashMap::new();
        for layer in layers {
            let bar = multi.add(ProgressBar::new(regions as u64));
            bar.set_style(style.clone());
            bar.set_prefix(layer.clone());
            bar.enable_steady_tick(Duration::from_millis(200));
            bars.insert(layer.clone(), bar);
        }
        Progress {
            live: Some(Live {
                multi,
                bars,
                counts: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Reports a failed request that is tried again after `wait`.
    pub fn retrying(&self, layer: &str, region: &str, request: &str, failure: &Failure, attempt: u32, wait: Duration) {
        match &self.live {
            Some(live) => live.update(layer, |counts| counts.retries += 1),
            None => eprintln!(
                "publish: {layer} in {region}: {request} failed ({}), attempt {attempt} of {ATTEMPTS}; next in {:.1} s",
                failure.message,
                wait.as_secs_f64()
            ),
        }
    }

    /// Reports a step that is not a result, such as an S3 upload.
    pub fn step(&self, layer: &str, region: &str, text: &str) {
        if self.live.is_none() {
            eprintln!("publish: {layer} in {region}: {text}");
        }
    }

    /// Reports a finished pair.
    pub fn finished(&self, report: &PairReport) {
        let line = format!("publish: {} in {}: {}", report.layer, report.region, report.outcome);
        let Some(live) = &self.live else {
            eprintln!("{line}");
            return;
        };
        live.update(&report.layer, |counts| counts.outcomes.add(&report.outcome));
        if let Some(bar) = live.bars.get(&report.layer) {
            bar.inc(1);
        }
        if matches!(report.outcome, Outcome::Failed(_)) {
            let _ = live.multi.println(line);
        }
    }

    /// Stops drawing: the summary follows.
    pub fn finish(&self) {
        if let Some(live) = &self.live {
            for bar in live.bars.values() {
                bar.finish();
            }
        }
    }
}

impl Live {
    fn update(&self, layer: &str, change: impl FnOnce(&mut LayerCounts)) {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = counts.entry(layer.to_string()).or_default();
        change(entry);
        if let Some(bar) = self.bars.get(layer) {
            bar.set_message(entry.message());
        }
    }
}
