//! `cargo xtask publish`: makes the zips in `dist/` public Lambda layer
//! versions in many regions, and records the versions in `layers.json`.
//!
//! PublishLayerVersion is not idempotent: a retry after a lost response
//! would create a second version. So before every attempt the task reads
//! the layer's latest version and compares its CodeSha256 with the zip's.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aws_sdk_lambda::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{Architecture, LayerVersionContentInput, Runtime};
use serde::Deserialize;

use crate::build_layers::{Manifest, ManifestLayer, MANIFEST_NAME};
use crate::flags::{Arch, PublishArgs};
use crate::project_root;

/// Largest zip PublishLayerVersion takes inline.
const INLINE_LIMIT: u64 = 50 * 1024 * 1024;
/// Attempts per request before a region is reported failed.
const ATTEMPTS: u32 = 5;
/// Statement id of the public read permission.
const PUBLIC_STATEMENT: &str = "public-read";

/// The regions of `layers/regions.toml`.
#[derive(Debug, Deserialize)]
pub struct Regions {
    pub enabled: Vec<String>,
    pub opt_in: Vec<String>,
}

impl Regions {
    pub fn load(path: &Path) -> Result<Regions> {
        let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))
    }

    /// Expands `all` and checks the other names against the list.
    pub fn select(&self, wanted: &[String]) -> Result<Vec<String>> {
        let mut selected = Vec::new();
        for name in wanted {
            if name == "all" {
                selected.extend(self.enabled.iter().chain(&self.opt_in).cloned());
            } else if self.enabled.contains(name) || self.opt_in.contains(name) {
                selected.push(name.clone());
            } else {
                bail!("unknown region {name}: layers/regions.toml lists the regions where Lambda runs");
            }
        }
        selected.sort();
        selected.dedup();
        Ok(selected)
    }
}

/// The result for one layer in one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Published(i64),
    UpToDate(i64),
    /// `--dry-run`: the layer would be published.
    WouldPublish,
    Failed(String),
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

pub fn run(args: &PublishArgs) -> Result<()> {
    let project = project_root();
    let dist = args.common.out_dir(&project);
    let manifest_path = dist.join(MANIFEST_NAME);
    let manifest: Manifest = serde_json::from_str(&fs::read_to_string(&manifest_path).with_context(|| {
        format!(
            "cannot read {}: run `cargo xtask build-layers` first",
            manifest_path.display()
        )
    })?)
    .with_context(|| format!("invalid {}", manifest_path.display()))?;
    let regions = Regions::load(&project.join("layers/regions.toml"))?.select(&args.regions)?;

    let mut layers = Vec::new();
    for layer in &manifest.layers {
        if !args.arch.is_empty() && !args.arch.contains(&layer.architecture) {
            continue;
        }
        let name = format!("{}{}", args.layer_prefix, layer.name);
        check_layer_name(&name)?;
        if layer.zip_bytes > INLINE_LIMIT {
            bail!(
                "{} is {} bytes: zips over {INLINE_LIMIT} bytes need an S3 upload, which this task does not do yet",
                layer.zip,
                layer.zip_bytes
            );
        }
        let zip = dist.join(&layer.zip);
        if !zip.is_file() {
            bail!("{} is missing: run `cargo xtask build-layers`", zip.display());
        }
        layers.push((name, layer.clone(), zip));
    }
    if layers.is_empty() {
        bail!("no layer in {} matches the filters", manifest_path.display());
    }

    eprintln!(
        "publish: {} layers to {} regions, {} at a time{}",
        layers.len(),
        regions.len(),
        args.concurrency,
        if args.dry_run { " (dry run)" } else { "" }
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let results = runtime.block_on(publish_all(args, &layers, &regions))?;

    print_summary(&results);
    if !args.dry_run {
        let table_path = args.table.clone().unwrap_or_else(|| project.join("layers.json"));
        write_table(&table_path, &results)?;
        eprintln!("publish: versions written to {}", table_path.display());
    }
    let failed = results
        .iter()
        .filter(|(_, _, outcome)| matches!(outcome, Outcome::Failed(_)))
        .count();
    if failed > 0 {
        bail!("{failed} layer and region pairs failed; run the task again to publish only what is missing");
    }
    Ok(())
}

type Results = Vec<(String, String, Outcome)>;

async fn publish_all(
    args: &PublishArgs,
    layers: &[(String, ManifestLayer, PathBuf)],
    regions: &[String],
) -> Result<Results> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for region in regions {
        let client = client(region, args.endpoint_url.as_deref(), args.profile.as_deref()).await;
        for (name, layer, zip) in layers {
            let client = client.clone();
            let semaphore = semaphore.clone();
            let (name, layer, zip, region) = (name.clone(), layer.clone(), zip.clone(), region.clone());
            let (dry_run, private) = (args.dry_run, args.private);
            tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                let outcome = match publish_one(&client, &name, &layer, &zip, dry_run, private).await {
                    Ok(outcome) => outcome,
                    Err(error) => Outcome::Failed(format!("{error:#}")),
                };
                eprintln!("publish: {name} in {region}: {}", describe(&outcome));
                (name, region, outcome)
            });
        }
    }
    let mut results = Vec::new();
    while let Some(result) = tasks.join_next().await {
        results.push(result?);
    }
    results.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    Ok(results)
}

async fn client(region: &str, endpoint: Option<&str>, profile: Option<&str>) -> aws_sdk_lambda::Client {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .operation_attempt_timeout(Duration::from_secs(120))
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .timeout_config(timeouts)
        // The task retries itself, reading the layer again before each
        // publish attempt.
        .retry_config(aws_config::retry::RetryConfig::disabled());
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(profile) = profile {
        loader = loader.profile_name(profile);
    }
    aws_sdk_lambda::Client::new(&loader.load().await)
}

/// Publishes one layer in one region unless its latest version already
/// has the zip's content.
async fn publish_one(
    client: &aws_sdk_lambda::Client,
    name: &str,
    layer: &ManifestLayer,
    zip: &Path,
    dry_run: bool,
    private: bool,
) -> Result<Outcome> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let latest = match retry(|| latest_version(client, name)).await {
            Ok(latest) => latest,
            Err(error) => return Ok(Outcome::Failed(error)),
        };
        if let Some((version, sha)) = &latest {
            if *sha == layer.code_sha256 {
                if !dry_run && !private {
                    if let Err(error) = retry(|| make_public(client, name, *version)).await {
                        return Ok(Outcome::Failed(error));
                    }
                }
                return Ok(if attempt == 1 {
                    Outcome::UpToDate(*version)
                } else {
                    Outcome::Published(*version)
                });
            }
        }
        if dry_run {
            return Ok(Outcome::WouldPublish);
        }
        let bytes = tokio::fs::read(zip).await?;
        let architecture = match layer.architecture {
            Arch::X86_64 => Architecture::X8664,
            Arch::Arm64 => Architecture::Arm64,
        };
        let request = client
            .publish_layer_version()
            .layer_name(name)
            .description(format!("{}, sha256 {}", layer.description, layer.code_sha256))
            .content(LayerVersionContentInput::builder().zip_file(Blob::new(bytes)).build())
            .compatible_runtimes(Runtime::Providedal2023)
            .compatible_architectures(architecture)
            .license_info("PHP-3.01")
            .send()
            .await;
        match request {
            Ok(_) => continue,
            Err(error) => {
                let (retryable, message) = classify(&error);
                if !retryable || attempt >= ATTEMPTS {
                    return Ok(Outcome::Failed(message));
                }
                // The version may exist although the response was lost:
                // the next loop reads it before publishing again.
                backoff(attempt).await;
            }
        }
    }
}

/// The latest version of `name` and its CodeSha256, or `None`.
async fn latest_version(client: &aws_sdk_lambda::Client, name: &str) -> Result<Option<(i64, String)>, SdkFailure> {
    let list = client
        .list_layer_versions()
        .layer_name(name)
        .max_items(1)
        .send()
        .await
        .map_err(|error| SdkFailure::from(&error))?;
    let Some(version) = list.layer_versions().iter().map(|item| item.version()).max() else {
        return Ok(None);
    };
    let details = client
        .get_layer_version()
        .layer_name(name)
        .version_number(version)
        .send()
        .await
        .map_err(|error| SdkFailure::from(&error))?;
    let sha = details
        .content()
        .and_then(|content| content.code_sha256())
        .unwrap_or_default();
    Ok(Some((version, sha.to_string())))
}

async fn make_public(client: &aws_sdk_lambda::Client, name: &str, version: i64) -> Result<(), SdkFailure> {
    let result = client
        .add_layer_version_permission()
        .layer_name(name)
        .version_number(version)
        .statement_id(PUBLIC_STATEMENT)
        .action("lambda:GetLayerVersion")
        .principal("*")
        .send()
        .await;
    match result {
        Ok(_) => Ok(()),
        // The statement is there from an earlier run.
        Err(error) if error.code() == Some("ResourceConflictException") => Ok(()),
        Err(error) => Err(SdkFailure::from(&error)),
    }
}

/// A failed request, and whether trying again may help.
#[derive(Debug)]
struct SdkFailure {
    retryable: bool,
    message: String,
}

impl<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug> From<&SdkError<E, R>> for SdkFailure {
    fn from(error: &SdkError<E, R>) -> SdkFailure {
        let (retryable, message) = classify(error);
        SdkFailure { retryable, message }
    }
}

/// Throttling, server errors, timeouts and broken connections are worth
/// another attempt; access and validation errors are not.
fn classify<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(error: &SdkError<E, R>) -> (bool, String) {
    match error {
        SdkError::TimeoutError(_) => (true, "timed out".to_string()),
        SdkError::DispatchFailure(failure) => (true, format!("connection failed: {failure:?}")),
        SdkError::ResponseError(_) => (true, "invalid or cut response".to_string()),
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("unknown");
            let message = service.err().message().unwrap_or_default();
            let retryable = matches!(
                code,
                "TooManyRequestsException" | "ServiceException" | "ThrottlingException" | "EC2ThrottledException"
            ) || code.starts_with("5");
            (retryable, format!("{code}: {message}"))
        }
        other => (false, format!("{other:?}")),
    }
}

/// Runs `request` until it succeeds, fails for good, or runs out of attempts.
async fn retry<T, F, Fut>(mut request: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SdkFailure>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match request().await {
            Ok(value) => return Ok(value),
            Err(failure) if failure.retryable && attempt < ATTEMPTS => backoff(attempt).await,
            Err(failure) => return Err(failure.message),
        }
    }
}

/// Exponential backoff with jitter: up to 0.2 s, 0.4 s, 0.8 s, ...
async fn backoff(attempt: u32) {
    let ceiling = 200u64 << attempt.min(6);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |time| time.subsec_nanos() as u64);
    tokio::time::sleep(Duration::from_millis(ceiling / 2 + nanos % (ceiling / 2))).await;
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Published(version) => format!("published (version {version})"),
        Outcome::UpToDate(version) => format!("up to date (version {version})"),
        Outcome::WouldPublish => "would publish".to_string(),
        Outcome::Failed(reason) => format!("failed: {reason}"),
    }
}

fn print_summary(results: &Results) {
    println!("{:<24} {:<16} result", "layer", "region");
    for (name, region, outcome) in results {
        println!("{name:<24} {region:<16} {}", describe(outcome));
    }
}

/// Merges the published versions into the table at `path` (layer → region
/// → version); regions not touched keep their entry. Written atomically.
pub fn write_table(path: &Path, results: &Results) -> Result<()> {
    let mut table: BTreeMap<String, BTreeMap<String, i64>> = match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    for (name, region, outcome) in results {
        if let Outcome::Published(version) | Outcome::UpToDate(version) = outcome {
            table.entry(name.clone()).or_default().insert(region.clone(), *version);
        }
    }
    let partial = crate::process::partial_path(path);
    fs::write(&partial, serde_json::to_string_pretty(&table)? + "\n")?;
    fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))?;
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
    fn regions_expand_and_reject_unknown() {
        let regions = Regions::load(&project_root().join("layers/regions.toml")).unwrap();
        let all = regions.select(&["all".to_string()]).unwrap();
        assert!(all.len() >= 30, "{all:?}");
        assert!(all.contains(&"us-east-1".to_string()));
        let two = regions
            .select(&["eu-west-3".to_string(), "us-east-1".to_string()])
            .unwrap();
        assert_eq!(two, ["eu-west-3", "us-east-1"]);
        let error = regions.select(&["moon-1".to_string()]).unwrap_err().to_string();
        assert!(error.contains("unknown region moon-1"), "{error}");
    }

    #[test]
    fn table_merges_and_keeps_untouched_regions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layers.json");
        fs::write(&path, r#"{"php-82": {"us-east-1": 3, "eu-west-1": 7}}"#).unwrap();
        let results = vec![
            ("php-82".to_string(), "us-east-1".to_string(), Outcome::Published(4)),
            (
                "php-82".to_string(),
                "sa-east-1".to_string(),
                Outcome::Failed("throttled".to_string()),
            ),
            ("arm-php-82".to_string(), "us-east-1".to_string(), Outcome::UpToDate(2)),
        ];
        write_table(&path, &results).unwrap();
        let table: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(table["php-82"]["us-east-1"], 4);
        assert_eq!(table["php-82"]["eu-west-1"], 7);
        assert!(table["php-82"].get("sa-east-1").is_none());
        assert_eq!(table["arm-php-82"]["us-east-1"], 2);
    }
}
