//! `cargo xtask publish`: makes the zips in `dist/` public Lambda layer
//! versions in many regions, and records the versions in `layers.json`.
//!
//! PublishLayerVersion is not idempotent: a retry after a lost response
//! would create a second version. So the task reads the layer's newest
//! version first and compares its digest with the zip's, and after a
//! failed publish attempt it reads again before trying once more.

mod aws;
mod progress;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::json;

use crate::build_layers::{Manifest, ManifestLayer, MANIFEST_NAME};
use crate::flags::PublishArgs;
use crate::project_root;
use aws::{Clients, Content, Failure, Latest, PublishRequest, ATTEMPTS, DIGEST_MARKER};
use progress::Progress;

/// Largest zip PublishLayerVersion takes inline.
pub const INLINE_LIMIT: u64 = 50 * 1024 * 1024;

/// Largest unzipped size of a layer Lambda accepts.
const UNZIPPED_LIMIT: u64 = 250 * 1024 * 1024;

/// Wait after a timed out publish request before looking for the version
/// it may have made.
/// NOTE: a request still running at Lambda after this wait can make a
/// second version; the next run then reports the newest one.
const LOST_REQUEST_WAIT: Duration = Duration::from_secs(5);

/// License of the PHP interpreter, the bulk of every layer.
const LICENSE: &str = "PHP-3.01";

/// Error codes Lambda returns in an opt-in region the account has not
/// enabled, because the region does not recognise the account's credentials.
const NOT_ENABLED_CODES: &[&str] = &["UnrecognizedClientException", "InvalidClientTokenId", "AuthFailure"];

/// The regions of `layers/regions.toml`.
#[derive(Debug, Deserialize)]
pub struct Regions {
    pub enabled: Vec<String>,
    pub opt_in: Vec<String>,
}

/// The regions `--regions` names: the known ones, and the names not in
/// the list, which are reported as failed.
#[derive(Debug, PartialEq, Eq)]
pub struct Selection {
    pub known: Vec<String>,
    pub unknown: Vec<String>,
}

impl Regions {
    pub fn load(path: &Path) -> Result<Regions> {
        let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))
    }

    /// Expands `all` and sorts the other names into known and unknown,
    /// trimmed, and without empty ones (as a trailing comma gives).
    pub fn select(&self, requested: &[String]) -> Selection {
        let mut selection = Selection {
            known: Vec::new(),
            unknown: Vec::new(),
        };
        for name in requested.iter().map(|name| name.trim()).filter(|name| !name.is_empty()) {
            let name = name.to_string();
            if name == "all" {
                selection.known.extend(self.enabled.iter().chain(&self.opt_in).cloned());
            } else if self.enabled.contains(&name) || self.opt_in.contains(&name) {
                selection.known.push(name);
            } else {
                selection.unknown.push(name);
            }
        }
        for list in [&mut selection.known, &mut selection.unknown] {
            list.sort();
            list.dedup();
        }
        selection
    }
}

/// The result for one layer in one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Published(i64),
    UpToDate(i64),
    /// The version had the zip's content, and this run added its public
    /// permission.
    MadePublic(i64),
    /// `--dry-run`: the layer would be published, replacing this version.
    WouldPublish(Option<i64>),
    /// `--dry-run`: the version has the zip's content, but layers.json does
    /// not record it, so the run would add its public permission unless it
    /// exists.
    WouldMakePublic(i64),
    Failed(String),
}

impl Outcome {
    /// Returns the public version that layers.json records for this
    /// outcome, if any.
    fn version_to_record(&self) -> Option<i64> {
        match *self {
            Outcome::Published(version) | Outcome::UpToDate(version) | Outcome::MadePublic(version) => Some(version),
            Outcome::WouldPublish(_) | Outcome::WouldMakePublic(_) | Outcome::Failed(_) => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Published(version) => write!(f, "published (version {version})"),
            Outcome::UpToDate(version) => write!(f, "up to date (version {version})"),
            Outcome::WouldPublish(None) => write!(f, "would publish (first version)"),
            Outcome::WouldPublish(Some(version)) => write!(f, "would publish (after version {version})"),
            Outcome::MadePublic(version) => write!(f, "up to date (version {version}), made public"),
            Outcome::WouldMakePublic(version) => {
                write!(f, "up to date (version {version}), would make public if needed")
            }
            Outcome::Failed(reason) => write!(f, "failed: {reason}"),
        }
    }
}

/// Outcome of one layer in one region, with its retries.
#[derive(Debug, Clone)]
pub struct PairReport {
    pub layer: String,
    pub region: String,
    pub outcome: Outcome,
    /// Requests that failed and were tried again.
    pub retries: u32,
    /// Kind of the failure, for an `Outcome::Failed`.
    pub failure: Option<FailureKind>,
}

/// Cause of a failed pair, which decides the advice for the next run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A name in --regions that layers/regions.toml does not list.
    UnknownRegion,
    /// Throttling, a server error or a timeout, which may pass.
    Transient,
    /// An error that stays until the user fixes it, such as access denied.
    Lasting,
}

/// A zip of the output directory, checked and ready to publish.
#[derive(Debug, Clone)]
struct LocalLayer {
    /// The name in Lambda, with the prefix.
    name: String,
    layer: ManifestLayer,
    zip: PathBuf,
}

/// Checks a layer name as Lambda does: 1 to 140 letters, digits, `-` or `_`.
pub fn check_layer_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 140
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        bail!("invalid layer name {name:?}: use 1 to 140 letters, digits, '-' or '_'");
    }
    Ok(())
}

/// Checks that `PREFIX-REGION` is a valid S3 bucket name for every region.
pub fn check_bucket_prefix(prefix: &str, regions: &[String]) -> Result<()> {
    let longest_region = regions.iter().map(String::len).max().unwrap_or(0);
    let longest = prefix.len() + 1 + longest_region;
    let valid = prefix.len() >= 3
        && longest <= 63
        && prefix.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !prefix.contains("..");
    if !valid {
        bail!(
            "invalid --s3-bucket-prefix {prefix:?}: use 3 to {} lowercase letters, digits, '-' or '.', \
             starting with a letter or digit, so that PREFIX-REGION is a bucket name",
            62 - longest_region
        );
    }
    Ok(())
}

/// Returns the bucket of `region` for zips over the inline limit.
fn bucket_name(prefix: &str, region: &str) -> String {
    format!("{prefix}-{region}")
}

pub fn run(args: &PublishArgs) -> Result<()> {
    let project = project_root();
    let dist = crate::flags::absolute(args.out_dir.clone().unwrap_or_else(|| project.join("dist")));
    let regions = Regions::load(&project.join("layers/regions.toml"))?;
    let selection = regions.select(&args.regions);
    if selection.known.is_empty() {
        if selection.unknown.is_empty() {
            bail!("--regions is empty: give region names separated by commas, or `all`");
        }
        let unknown: Vec<String> = selection.unknown.iter().map(|name| format!("{name:?}")).collect();
        let noun = if unknown.len() == 1 { "region" } else { "regions" };
        bail!(
            "unknown {noun} {}: not found in layers/regions.toml. Check the spelling, or use `--regions all`",
            unknown.join(", ")
        );
    }
    let layers = local_layers(args, &dist, &selection.known)?;
    // The table lists public versions only, so a private run writes none.
    if args.private && args.table.is_some() {
        eprintln!("warning: --table is ignored with --private, which writes no table");
    }
    let table_path = match (&args.table, args.private) {
        (_, true) => None,
        (Some(path), false) => Some(path.clone()),
        (None, false) => Some(project.join("layers.json")),
    };
    let recorded = match &table_path {
        Some(path) => {
            check_writable(path)?;
            read_table(path)?
        }
        None => Table::new(),
    };

    for region in &selection.unknown {
        eprintln!("warning: {}", unknown_region(region));
    }
    let mut notes = Vec::new();
    if args.dry_run {
        notes.push("dry run: read requests only".to_string());
    }
    if args.private {
        notes.push("private: no public permission, and no version table".to_string());
    }
    if !selection.unknown.is_empty() {
        notes.push(format!(
            "and {}, whose pairs fail",
            plural(selection.unknown.len(), "unknown region")
        ));
    }
    eprintln!(
        "publish: {} to {}, {} requests at a time{}",
        plural(layers.len(), "layer"),
        plural(selection.known.len(), "region"),
        args.concurrency,
        if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join("; "))
        }
    );
    let started = Instant::now();
    let names: Vec<String> = layers.iter().map(|layer| layer.name.clone()).collect();
    let progress = Arc::new(Progress::new(&names, selection.known.len()));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let config = runtime.block_on(aws::shared_config(&settings(args)));
    runtime.block_on(Clients::check_credentials(&config, args.profile.as_deref()))?;
    let mut reports = runtime.block_on(publish_all(
        &config,
        args,
        &layers,
        &selection.known,
        &regions,
        recorded,
        progress.clone(),
    ))?;
    progress.finish();
    for region in &selection.unknown {
        for layer in &layers {
            reports.push(PairReport {
                layer: layer.name.clone(),
                region: region.clone(),
                outcome: Outcome::Failed(unknown_region(region)),
                retries: 0,
                failure: Some(FailureKind::UnknownRegion),
            });
        }
    }
    reports.sort_by(|a, b| (&a.layer, &a.region).cmp(&(&b.layer, &b.region)));

    // The summary comes first, so that it is printed even when the table
    // cannot be written.
    // A run where every pair failed creates no empty table.
    let has_version = reports
        .iter()
        .any(|report| report.outcome.version_to_record().is_some());
    let written = table_path.filter(|path| !args.dry_run && (has_version || path.exists()));
    if args.json {
        print_json(&reports, written.as_ref())?;
    } else {
        print_summary(&reports, args.dry_run);
    }
    if let Some(path) = &written {
        write_table(path, &reports)?;
    }
    eprintln!(
        "publish: done in {:.1} s{}",
        started.elapsed().as_secs_f64(),
        match &written {
            Some(path) => format!("; versions written to {}", path.display()),
            None => String::new(),
        }
    );
    if let Some(advice) = failure_advice(&reports, args.dry_run) {
        bail!(advice);
    }
    Ok(())
}

/// Returns the final error of a run where some pairs failed, with what to
/// do about them, or `None` when no pair failed.
fn failure_advice(reports: &[PairReport], dry_run: bool) -> Option<String> {
    let failures: Vec<FailureKind> = reports.iter().filter_map(|report| report.failure).collect();
    if failures.is_empty() {
        return None;
    }
    let pairs = if reports.len() == 1 { "pair" } else { "pairs" };
    let mut message = format!(
        "{} of {} layer and region {pairs} failed.",
        failures.len(),
        reports.len()
    );
    let unknown = failures.contains(&FailureKind::UnknownRegion);
    let lasting = failures.contains(&FailureKind::Lasting);
    if unknown {
        message.push_str(" Fix or remove the unknown regions in --regions.");
    }
    if lasting {
        message.push_str(" Fix the errors shown in the summary: README.md lists the IAM policy that the task needs.");
    }
    if !dry_run {
        let then = if unknown || lasting { "Then run" } else { "Run" };
        message.push_str(&format!(" {then} the task again: it publishes only what is missing."));
    }
    Some(message)
}

fn unknown_region(region: &str) -> String {
    format!("unknown region {region:?}: not found in layers/regions.toml. Check the spelling, or add the region there")
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Fails before any request when the table's directory is missing, since
/// the versions could not be recorded at the end.
fn check_writable(table: &Path) -> Result<()> {
    let directory = match table.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if table.is_dir() {
        bail!("--table {} is a directory: give a file path", table.display());
    }
    if !directory.is_dir() {
        bail!(
            "cannot write {}: directory {} not found. Create it, or choose another --table",
            table.display(),
            directory.display()
        );
    }
    Ok(())
}

fn settings(args: &PublishArgs) -> aws::Settings {
    aws::Settings {
        endpoint: args.endpoint_url.clone(),
        profile: args.profile.clone(),
        timeout: Duration::from_secs(args.timeout),
    }
}

/// Reads the manifest and checks every selected zip before any request:
/// its name, its size, its digest, and its acceptance test.
fn local_layers(args: &PublishArgs, dist: &Path, regions: &[String]) -> Result<Vec<LocalLayer>> {
    let manifest_path = dist.join(MANIFEST_NAME);
    let text = fs::read_to_string(&manifest_path).with_context(|| {
        format!(
            "cannot read {}: run `cargo xtask build-layers` first",
            manifest_path.display()
        )
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("invalid {}", manifest_path.display()))?;
    if let Some(prefix) = &args.s3_bucket_prefix {
        check_bucket_prefix(prefix, regions)?;
    }

    let mut layers = Vec::new();
    for layer in manifest.layers {
        let selected = (args.arch.is_empty() || args.arch.contains(&layer.architecture))
            && (args.layer.is_empty() || args.layer.contains(&layer.kind))
            && (args.php.is_empty()
                || args
                    .php
                    .iter()
                    .any(|php| layer.php_version.starts_with(&format!("{php}."))));
        if !selected {
            continue;
        }
        let name = format!("{}{}", args.layer_prefix, layer.name);
        if !args.layer_prefix.is_empty() {
            check_layer_name(&name).with_context(|| format!("invalid --layer-prefix {:?}", args.layer_prefix))?;
        } else {
            check_layer_name(&name)?;
        }
        check_sizes(&layer, args.s3_bucket_prefix.is_some())?;
        let zip = dist.join(&layer.zip);
        if !zip.exists() {
            bail!(
                "{} not found, though {MANIFEST_NAME} lists it: run `cargo xtask build-layers` again",
                zip.display()
            );
        }
        let digest = crate::sources::sha256_file(&zip)?;
        if digest != layer.sha256 {
            bail!(
                "{} changed since {MANIFEST_NAME} was written (sha256 {digest}, the manifest says {}): \
                 run `cargo xtask build-layers` again",
                zip.display(),
                layer.sha256
            );
        }
        if !args.skip_tests_check {
            match check_acceptance(&layer) {
                Ok(()) => {}
                // A dry run publishes nothing: it only warns.
                Err(error) if args.dry_run => eprintln!("warning: {error}"),
                Err(error) => return Err(error),
            }
        }
        layers.push(LocalLayer { name, layer, zip });
    }
    if layers.is_empty() {
        bail!(
            "no layer in {} matches --php, --arch and --layer",
            manifest_path.display()
        );
    }
    Ok(layers)
}

/// Refuses zips Lambda would refuse, before any upload.
fn check_sizes(layer: &ManifestLayer, have_bucket: bool) -> Result<()> {
    if layer.unzipped_bytes > UNZIPPED_LIMIT {
        bail!(
            "{} unzips to {} bytes, over the {UNZIPPED_LIMIT} bytes Lambda allows for a function and its layers",
            layer.zip,
            layer.unzipped_bytes
        );
    }
    if layer.zip_bytes > INLINE_LIMIT && !have_bucket {
        bail!(
            "{} is {} bytes, over the {INLINE_LIMIT} bytes Lambda takes in the request: \
             give --s3-bucket-prefix to upload it through an S3 bucket in each region",
            layer.zip,
            layer.zip_bytes
        );
    }
    Ok(())
}

/// Refuses a zip whose acceptance test has not passed since it was built.
fn check_acceptance(layer: &ManifestLayer) -> Result<()> {
    match &layer.acceptance {
        Some(acceptance) if acceptance.zip_sha256 == layer.sha256 => Ok(()),
        Some(_) => bail!(
            "the acceptance tests passed for an earlier build of {}, not for this one: \
             run `cargo xtask test --no-build`, or give --skip-tests-check",
            layer.zip
        ),
        None => bail!(
            "no acceptance test has passed for {}: run `cargo xtask test --no-build`, or give --skip-tests-check",
            layer.zip
        ),
    }
}

/// State shared by every pair of a run.
struct Shared {
    dry_run: bool,
    private: bool,
    s3_bucket_prefix: Option<String>,
    /// The versions layers.json held when the run started.
    recorded: Table,
    opt_in: Vec<String>,
    progress: Arc<Progress>,
    semaphore: Arc<tokio::sync::Semaphore>,
}

async fn publish_all(
    config: &aws_config::SdkConfig,
    args: &PublishArgs,
    layers: &[LocalLayer],
    regions: &[String],
    known: &Regions,
    recorded: Table,
    progress: Arc<Progress>,
) -> Result<Vec<PairReport>> {
    let settings = settings(args);
    let shared = Arc::new(Shared {
        dry_run: args.dry_run,
        private: args.private,
        s3_bucket_prefix: args.s3_bucket_prefix.clone(),
        recorded,
        opt_in: known.opt_in.clone(),
        progress,
        semaphore: Arc::new(tokio::sync::Semaphore::new(usize::from(args.concurrency))),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for region in regions {
        let clients = Clients::new(config, region, &settings);
        for layer in layers {
            let pair = Pair {
                clients: clients.clone(),
                local: layer.clone(),
                region: region.clone(),
                shared: shared.clone(),
                retries: 0,
            };
            tasks.spawn(pair.run());
        }
    }
    let mut reports = Vec::new();
    while let Some(report) = tasks.join_next().await {
        let report = report.context("a publish task panicked")?;
        shared.progress.finished(&report);
        reports.push(report);
    }
    Ok(reports)
}

/// One layer in one region.
struct Pair {
    clients: Clients,
    local: LocalLayer,
    region: String,
    shared: Arc<Shared>,
    retries: u32,
}

impl Pair {
    async fn run(mut self) -> PairReport {
        let (outcome, kind) = match self.publish().await {
            Ok(outcome) => (outcome, None),
            Err(failure) => {
                let kind = if failure.retryable {
                    FailureKind::Transient
                } else {
                    FailureKind::Lasting
                };
                (Outcome::Failed(self.explain(failure)), Some(kind))
            }
        };
        PairReport {
            layer: self.local.name.clone(),
            region: self.region.clone(),
            outcome,
            retries: self.retries,
            failure: kind,
        }
    }

    /// Publishes the layer unless its newest version has the zip's content.
    async fn publish(&mut self) -> Result<Outcome, Failure> {
        let name = self.local.name.clone();
        let digest = self.local.layer.code_sha256.clone();
        let latest = self.latest().await?;
        if let Some(latest) = &latest {
            if latest.code_sha256 == digest && (latest.verified || self.confirm(latest.version, &digest).await?) {
                return self.ensure_public(latest.version).await;
            }
        }
        // A version found after a failed attempt below is this run's only
        // when it is newer than the newest version now.
        let newest_before = latest.as_ref().map(|latest| latest.version);
        if self.shared.dry_run {
            return Ok(Outcome::WouldPublish(newest_before));
        }

        let content = self.content().await?;
        let description = format!("{}, {DIGEST_MARKER}{digest}", self.local.layer.description);
        let runtimes = self.local.layer.compatible_runtimes.clone();
        let request = PublishRequest {
            name: &name,
            description: &description,
            architecture: self.local.layer.architecture,
            runtimes: &runtimes,
            license: LICENSE,
            content,
            bytes: self.local.layer.zip_bytes,
        };
        let mut attempt = 0;
        let published = loop {
            attempt += 1;
            let result = {
                let _slot = self.shared.semaphore.acquire().await;
                self.clients.publish(&request).await
            };
            let failure = match result {
                Ok(published) => break published,
                Err(failure) => failure,
            };
            if !failure.retryable {
                return Err(failure);
            }
            // The version may exist although its response was lost. A timed
            // out request may still be running at Lambda, so look later.
            let minimum = if failure.timed_out {
                LOST_REQUEST_WAIT
            } else {
                Duration::ZERO
            };
            let last = attempt >= ATTEMPTS;
            if last {
                self.shared.progress.step(
                    &name,
                    &self.region,
                    &format!(
                        "PublishLayerVersion failed on attempt {attempt} of {ATTEMPTS} ({}); checking whether it \
                         published a version",
                        failure.message
                    ),
                );
                tokio::time::sleep(minimum).await;
            } else {
                self.wait("PublishLayerVersion", &failure, attempt, minimum).await;
            }
            let found = self.latest().await?.filter(|found| {
                found.code_sha256 == digest && newest_before.is_none_or(|before| found.version > before)
            });
            if let Some(found) = found {
                let version = found.version;
                self.shared.progress.step(
                    &name,
                    &self.region,
                    &format!("version {version} exists: the failed attempt had published it"),
                );
                if found.verified {
                    break found;
                }
                let code_sha256 = self
                    .request("GetLayerVersion", |clients| {
                        let name = name.clone();
                        async move { clients.code_sha256(&name, version).await }
                    })
                    .await?;
                break Latest {
                    version,
                    code_sha256,
                    verified: true,
                };
            }
            if last {
                return Err(failure);
            }
        };
        if published.code_sha256 != digest {
            return Err(Failure::permanent(format!(
                "Lambda computed CodeSha256 {} for version {}, but the zip's is {digest}; the version is left \
                 private, and the next run publishes a new one",
                published.code_sha256, published.version
            )));
        }
        if !self.shared.private {
            self.make_public(published.version).await?;
        }
        Ok(Outcome::Published(published.version))
    }

    /// Returns the version layers.json records for this pair.
    fn recorded(&self) -> Option<i64> {
        self.shared
            .recorded
            .get(&self.local.name)
            .and_then(|regions| regions.get(&self.region))
            .copied()
    }

    /// Checks the CodeSha256 of a version whose description carries the
    /// zip's digest, unless layers.json records it. A description is
    /// written before Lambda computes the digest, so it alone does not
    /// prove the content.
    async fn confirm(&mut self, version: i64, digest: &str) -> Result<bool, Failure> {
        if self.recorded() == Some(version) {
            return Ok(true);
        }
        let name = self.local.name.clone();
        let code_sha256 = self
            .request("GetLayerVersion", |clients| {
                let name = name.clone();
                async move { clients.code_sha256(&name, version).await }
            })
            .await?;
        Ok(code_sha256 == digest)
    }

    /// Makes an up-to-date version public, unless this run is private or
    /// layers.json already records the version (a run records a version
    /// only after it is made public). A dry run only reports it.
    async fn ensure_public(&mut self, version: i64) -> Result<Outcome, Failure> {
        if self.shared.private || self.recorded() == Some(version) {
            return Ok(Outcome::UpToDate(version));
        }
        if self.shared.dry_run {
            return Ok(Outcome::WouldMakePublic(version));
        }
        if self.make_public(version).await? {
            Ok(Outcome::MadePublic(version))
        } else {
            Ok(Outcome::UpToDate(version))
        }
    }

    /// Returns the zip's path, or for a large zip, its S3 object after the
    /// upload.
    async fn content(&mut self) -> Result<Content, Failure> {
        let layer = &self.local.layer;
        if layer.zip_bytes <= INLINE_LIMIT {
            return Ok(Content::Inline(self.local.zip.clone()));
        }
        let Some(prefix) = self.shared.s3_bucket_prefix.clone() else {
            return Err(Failure::permanent(
                "no --s3-bucket-prefix for a zip over 50 MB".to_string(),
            ));
        };
        let bucket = bucket_name(&prefix, &self.region);
        let key = format!("{}/{}.zip", self.local.name, layer.sha256);
        let (zip, bytes, sha256) = (self.local.zip.clone(), layer.zip_bytes, layer.code_sha256.clone());
        let region = self.region.clone();
        self.request("CreateBucket", |clients| {
            let (bucket, region) = (bucket.clone(), region.clone());
            async move { clients.ensure_bucket(&bucket, &region).await }
        })
        .await?;
        let uploaded = self
            .request("PutObject", |clients| {
                let (bucket, key, zip, sha256) = (bucket.clone(), key.clone(), zip.clone(), sha256.clone());
                async move { clients.upload(&bucket, &key, &zip, bytes, &sha256).await }
            })
            .await?;
        let step = if uploaded {
            format!("uploaded to s3://{bucket}/{key}")
        } else {
            format!("s3://{bucket}/{key} has the zip already")
        };
        self.shared.progress.step(&self.local.name, &self.region, &step);
        Ok(Content::S3 { bucket, key })
    }

    /// Runs `request` until it succeeds, fails for good, or runs out of
    /// attempts. Each attempt takes a concurrency slot, and the waits
    /// between attempts release it.
    async fn request<T, Fut>(&mut self, operation: &str, mut request: impl FnMut(Clients) -> Fut) -> Result<T, Failure>
    where
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = {
                let _slot = self.shared.semaphore.acquire().await;
                request(self.clients.clone()).await
            };
            match result {
                Ok(value) => return Ok(value),
                Err(failure) if failure.retryable && attempt < ATTEMPTS => {
                    self.wait(operation, &failure, attempt, Duration::ZERO).await
                }
                Err(failure) => return Err(failure),
            }
        }
    }

    /// Waits before the next attempt, at least `minimum`.
    async fn wait(&mut self, operation: &str, failure: &Failure, attempt: u32, minimum: Duration) {
        self.retries += 1;
        let wait = aws::backoff(attempt, failure.retry_after).max(minimum);
        self.shared
            .progress
            .retrying(&self.local.name, &self.region, operation, failure, attempt, wait);
        tokio::time::sleep(wait).await;
    }

    async fn latest(&mut self) -> Result<Option<Latest>, Failure> {
        let name = self.local.name.clone();
        self.request("ListLayerVersions", |clients| {
            let name = name.clone();
            async move { clients.latest(&name).await }
        })
        .await
    }

    async fn make_public(&mut self, version: i64) -> Result<bool, Failure> {
        let name = self.local.name.clone();
        self.request("AddLayerVersionPermission", |clients| {
            let name = name.clone();
            async move { clients.make_public(&name, version).await }
        })
        .await
    }

    /// Returns the reason shown for a failure, with a hint where one helps.
    fn explain(&self, failure: Failure) -> String {
        let not_enabled = failure
            .code
            .as_deref()
            .is_some_and(|code| NOT_ENABLED_CODES.contains(&code));
        if not_enabled && self.shared.opt_in.contains(&self.region) {
            return format!(
                "{} is an opt-in region, and this account has probably not enabled it: enable it in the \
                 account settings, or leave it out of --regions ({})",
                self.region, failure.message
            );
        }
        if failure.retryable {
            return format!("{} (after {ATTEMPTS} attempts)", failure.message);
        }
        failure.message
    }
}

/// Layer name → region → version, the shape of `layers.json`.
type Table = BTreeMap<String, BTreeMap<String, i64>>;

fn read_table(path: &Path) -> Result<Table> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Table::new()),
        Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Merges the versions of `reports` into the table at `path`; regions not
/// touched keep their entry. Written atomically.
pub fn write_table(path: &Path, reports: &[PairReport]) -> Result<()> {
    let mut table = read_table(path)?;
    for report in reports {
        if let Some(version) = report.outcome.version_to_record() {
            table
                .entry(report.layer.clone())
                .or_default()
                .insert(report.region.clone(), version);
        }
    }
    let partial = crate::process::partial_path(path);
    fs::write(&partial, serde_json::to_string_pretty(&table)? + "\n")
        .with_context(|| format!("cannot write {}", partial.display()))?;
    fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn print_summary(reports: &[PairReport], dry_run: bool) {
    let width = reports
        .iter()
        .map(|report| report.layer.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("{:<width$}  {:<16}  {:>7}  result", "layer", "region", "retries");
    for report in reports {
        println!(
            "{:<width$}  {:<16}  {:>7}  {}",
            report.layer, report.region, report.retries, report.outcome
        );
    }
    let counts = Counts::of(reports);
    if dry_run {
        println!(
            "{} would publish, {} up to date, {} would be made public if needed, {} failed",
            counts.would_publish, counts.up_to_date, counts.would_make_public, counts.failed
        );
    } else {
        println!(
            "{} published, {} up to date, {} made public, {} failed",
            counts.published, counts.up_to_date, counts.made_public, counts.failed
        );
    }
}

/// Number of pairs with each outcome.
#[derive(Debug, Default)]
pub struct Counts {
    pub published: usize,
    pub up_to_date: usize,
    pub made_public: usize,
    pub would_publish: usize,
    pub would_make_public: usize,
    pub failed: usize,
}

impl Counts {
    pub fn add(&mut self, outcome: &Outcome) {
        let count = match outcome {
            Outcome::Published(_) => &mut self.published,
            Outcome::UpToDate(_) => &mut self.up_to_date,
            Outcome::MadePublic(_) => &mut self.made_public,
            Outcome::WouldPublish(_) => &mut self.would_publish,
            Outcome::WouldMakePublic(_) => &mut self.would_make_public,
            Outcome::Failed(_) => &mut self.failed,
        };
        *count += 1;
    }

    fn of(reports: &[PairReport]) -> Counts {
        let mut counts = Counts::default();
        for report in reports {
            counts.add(&report.outcome);
        }
        counts
    }
}

fn print_json(reports: &[PairReport], table: Option<&PathBuf>) -> Result<()> {
    let pairs: Vec<_> = reports
        .iter()
        .map(|report| {
            let (result, version, reason) = match &report.outcome {
                Outcome::Published(version) => ("published", Some(*version), None),
                Outcome::UpToDate(version) => ("up-to-date", Some(*version), None),
                Outcome::MadePublic(version) => ("made-public", Some(*version), None),
                Outcome::WouldPublish(_) => ("would-publish", None, None),
                Outcome::WouldMakePublic(version) => ("would-make-public", Some(*version), None),
                Outcome::Failed(reason) => ("failed", None, Some(reason.clone())),
            };
            let replaces = match report.outcome {
                Outcome::WouldPublish(newest) => newest,
                _ => None,
            };
            json!({
                "layer": report.layer,
                "region": report.region,
                "result": result,
                "version": version,
                "replaces": replaces,
                "retries": report.retries,
                "reason": reason,
            })
        })
        .collect();
    let counts = Counts::of(reports);
    let summary = json!({
        "pairs": pairs,
        "published": counts.published,
        "up_to_date": counts.up_to_date,
        "made_public": counts.made_public,
        "would_publish": counts.would_publish,
        "would_make_public": counts.would_make_public,
        "failed": counts.failed,
        "table": table,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_are_checked() {
        check_layer_name("php-82").unwrap();
        check_layer_name("arm-php-82_fpm").unwrap();
        assert!(check_layer_name("").is_err());
        assert!(check_layer_name("php.82").is_err());
        assert!(check_layer_name(&"a".repeat(141)).is_err());
    }

    #[test]
    fn bucket_prefixes_are_checked() {
        let regions = ["us-east-1".to_string(), "ap-southeast-5".to_string()];
        check_bucket_prefix("acme-layers", &regions).unwrap();
        check_bucket_prefix("acme.layers.2026", &regions).unwrap();
        for invalid in ["ab", "Acme", "-acme", "acme_layers", "acme..layers", &"a".repeat(49)] {
            assert!(check_bucket_prefix(invalid, &regions).is_err(), "{invalid}");
        }
    }

    #[test]
    fn regions_expand_and_unknown_names_are_kept_apart() {
        let regions = Regions::load(&project_root().join("layers/regions.toml")).unwrap();
        let all = regions.select(&["all".to_string()]);
        assert!(all.known.len() >= 30, "{all:?}");
        assert!(all.known.contains(&"us-east-1".to_string()));
        assert!(all.unknown.is_empty());
        // Names are trimmed, and empty ones (a trailing comma) are dropped.
        let some = regions.select(&[
            "eu-west-3".to_string(),
            "moon-1".to_string(),
            " us-east-1".to_string(),
            "eu-west-3".to_string(),
            String::new(),
        ]);
        assert_eq!(
            some,
            Selection {
                known: vec!["eu-west-3".to_string(), "us-east-1".to_string()],
                unknown: vec!["moon-1".to_string()],
            }
        );
    }

    fn manifest_layer(zip_bytes: u64, unzipped_bytes: u64) -> ManifestLayer {
        serde_json::from_value(json!({
            "name": "php-82", "kind": "function", "architecture": "x86_64", "php_version": "8.2.32",
            "description": "PHP 8.2.32", "compatible_runtimes": ["provided.al2023"],
            "compatible_architectures": ["x86_64"], "glibc_max": "2.34", "ld_library_path": "",
            "loader": "", "zip": "php-82.zip", "sha256": "ab", "code_sha256": "qw==",
            "zip_bytes": zip_bytes, "unzipped_bytes": unzipped_bytes,
            "modules": {"php": [], "zend": []}, "disabled_extensions": {}, "libraries": [],
        }))
        .unwrap()
    }

    #[test]
    fn sizes_over_the_limits_are_refused() {
        check_sizes(&manifest_layer(INLINE_LIMIT, UNZIPPED_LIMIT), false).unwrap();
        let error = check_sizes(&manifest_layer(INLINE_LIMIT + 1, 1), false).unwrap_err();
        assert!(error.to_string().contains("--s3-bucket-prefix"), "{error}");
        check_sizes(&manifest_layer(INLINE_LIMIT + 1, 1), true).unwrap();
        let error = check_sizes(&manifest_layer(1, UNZIPPED_LIMIT + 1), true).unwrap_err();
        assert!(error.to_string().contains("unzips to"), "{error}");
    }

    #[test]
    fn acceptance_must_match_the_zip() {
        let mut layer = manifest_layer(1, 1);
        assert!(check_acceptance(&layer)
            .unwrap_err()
            .to_string()
            .contains("no acceptance test"));
        layer.acceptance = Some(crate::build_layers::Acceptance {
            zip_sha256: "cd".to_string(),
            passed_at: "2026-12-05T00:00:00Z".to_string(),
        });
        assert!(check_acceptance(&layer)
            .unwrap_err()
            .to_string()
            .contains("earlier build"));
        layer.acceptance.as_mut().unwrap().zip_sha256 = "ab".to_string();
        check_acceptance(&layer).unwrap();
    }

    fn report(layer: &str, region: &str, outcome: Outcome) -> PairReport {
        let failure = matches!(outcome, Outcome::Failed(_)).then_some(FailureKind::Lasting);
        PairReport {
            layer: layer.to_string(),
            region: region.to_string(),
            outcome,
            retries: 0,
            failure,
        }
    }

    #[test]
    fn failure_advice_fits_the_failures() {
        let unknown = PairReport {
            failure: Some(FailureKind::UnknownRegion),
            ..report("php-82", "moon-1", Outcome::Failed(unknown_region("moon-1")))
        };
        let throttled = PairReport {
            failure: Some(FailureKind::Transient),
            ..report(
                "php-82",
                "us-east-1",
                Outcome::Failed("throttled (after 5 attempts)".to_string()),
            )
        };
        let denied = report(
            "php-82",
            "eu-west-3",
            Outcome::Failed("AccessDeniedException".to_string()),
        );
        let published = report("php-82", "eu-west-1", Outcome::Published(3));

        assert_eq!(failure_advice(std::slice::from_ref(&published), false), None);
        let message = failure_advice(&[throttled.clone(), published.clone()], false).unwrap();
        assert_eq!(
            message,
            "1 of 2 layer and region pairs failed. Run the task again: it publishes only what is missing."
        );
        let message = failure_advice(std::slice::from_ref(&unknown), false).unwrap();
        assert!(message.starts_with("1 of 1 layer and region pair failed."), "{message}");
        assert!(message.contains("Fix or remove the unknown regions"), "{message}");
        assert!(!message.contains("IAM policy"), "{message}");
        let message = failure_advice(&[denied, throttled, unknown], true).unwrap();
        assert!(
            message.starts_with("3 of 3 layer and region pairs failed."),
            "{message}"
        );
        assert!(message.contains("IAM policy"), "{message}");
        assert!(message.contains("unknown regions"), "{message}");
        assert!(
            !message.contains("run the task again"),
            "a dry run advises a rerun: {message}"
        );
    }

    #[test]
    fn table_merges_and_keeps_untouched_regions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layers.json");
        fs::write(&path, r#"{"php-82": {"us-east-1": 3, "eu-west-1": 7}}"#).unwrap();
        let reports = vec![
            report("php-82", "us-east-1", Outcome::Published(4)),
            report("php-82", "sa-east-1", Outcome::Failed("throttled".to_string())),
            report("arm-php-82", "us-east-1", Outcome::UpToDate(2)),
        ];
        write_table(&path, &reports).unwrap();
        let table: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(table["php-82"]["us-east-1"], 4);
        assert_eq!(table["php-82"]["eu-west-1"], 7);
        assert!(table["php-82"].get("sa-east-1").is_none());
        assert_eq!(table["arm-php-82"]["us-east-1"], 2);
    }

    #[test]
    fn local_layers_report_missing_zip() {
        let dir = tempfile::tempdir().unwrap();
        let mut layer = manifest_layer(1, 1);
        layer.acceptance = None;
        fs::write(
            dir.path().join(MANIFEST_NAME),
            serde_json::to_string(&Manifest { layers: vec![layer] }).unwrap(),
        )
        .unwrap();
        let args = <crate::flags::Xtask as clap::Parser>::parse_from([
            "xtask",
            "publish",
            "--regions",
            "us-east-1",
            "--out-dir",
            dir.path().to_str().unwrap(),
        ]);
        let crate::flags::Task::Publish(args) = args.task else {
            panic!("not the publish task");
        };
        let error = format!("{:#}", local_layers(&args, dir.path(), &[]).unwrap_err());
        assert!(
            error.contains("php-82.zip") && error.contains("build-layers"),
            "{error}"
        );
    }
}
