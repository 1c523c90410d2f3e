//! The requests `cargo xtask publish` makes to Lambda and S3, the
//! classification of their errors, and their retries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_sdk_lambda::config::http::HttpResponse;
use aws_sdk_lambda::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{Architecture, LayerVersionContentInput, Runtime};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, ChecksumMode, CreateBucketConfiguration};

use crate::flags::Arch;

/// Attempts per request before the pair is reported failed.
pub const ATTEMPTS: u32 = 5;

/// User metadata key of an uploaded zip's SHA-256 digest (base64), for
/// stores whose HeadObject returns no checksum.
const SHA256_METADATA: &str = "sha256";

/// Statement id of the public read permission.
const PUBLIC_STATEMENT: &str = "public-read";

/// Text before the content digest in a version's description. Finding the
/// digest there saves a GetLayerVersion per layer and region.
pub const DIGEST_MARKER: &str = "sha256 ";

/// Slowest upload rate an upload attempt is given time for.
const MIN_UPLOAD_BYTES_PER_SECOND: u64 = 256 * 1024;

/// Maximum wait taken from a `Retry-After` header.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Connection settings shared by the clients of every region.
pub struct Settings {
    pub endpoint: Option<String>,
    pub profile: Option<String>,
    /// Time limit of one attempt of a request without a zip.
    pub timeout: Duration,
}

/// The Lambda and S3 clients of one region.
#[derive(Clone)]
pub struct Clients {
    pub lambda: aws_sdk_lambda::Client,
    pub s3: aws_sdk_s3::Client,
    timeout: Duration,
}

/// Loads the credentials and settings once, for every region.
pub async fn shared_config(settings: &Settings) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(settings.timeout)
                .build(),
        )
        // The task retries itself, and reads the layer again before each
        // new publish attempt.
        .retry_config(aws_config::retry::RetryConfig::disabled());
    if let Some(endpoint) = &settings.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(profile) = &settings.profile {
        // The default chain reads AWS_ACCESS_KEY_ID before any profile, so
        // the profile the user named gets its own provider.
        let credentials = aws_config::profile::ProfileFileCredentialsProvider::builder()
            .profile_name(profile)
            .build();
        loader = loader.profile_name(profile).credentials_provider(credentials);
    }
    loader.load().await
}

impl Clients {
    pub fn new(shared: &aws_config::SdkConfig, region: &str, settings: &Settings) -> Clients {
        let region = aws_config::Region::new(region.to_string());
        let lambda = aws_sdk_lambda::config::Builder::from(shared)
            .region(region.clone())
            .build();
        // An emulator's endpoint has no bucket subdomains.
        let s3 = aws_sdk_s3::config::Builder::from(shared)
            .region(region)
            .force_path_style(settings.endpoint.is_some())
            .build();
        Clients {
            lambda: aws_sdk_lambda::Client::from_conf(lambda),
            s3: aws_sdk_s3::Client::from_conf(s3),
            timeout: settings.timeout,
        }
    }

    /// Time limit of an attempt that uploads `bytes`.
    fn upload_timeout(&self, bytes: u64) -> TimeoutConfig {
        let seconds = self.timeout.as_secs() + bytes / MIN_UPLOAD_BYTES_PER_SECOND;
        TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(10))
            .operation_attempt_timeout(Duration::from_secs(seconds))
            .build()
    }

    /// Returns the newest version of `name` and its content digest, or
    /// `None` when the layer has no version.
    ///
    /// One ListLayerVersions call is enough when the description carries
    /// the digest, as the versions this task publishes do. Otherwise
    /// GetLayerVersion gives the CodeSha256.
    pub async fn latest(&self, name: &str) -> Result<Option<Latest>, Failure> {
        let list = self
            .lambda
            .list_layer_versions()
            .layer_name(name)
            .max_items(1)
            .send()
            .await
            .map_err(|error| Failure::from_sdk(&error))?;
        let Some(newest) = list.layer_versions().iter().max_by_key(|item| item.version()) else {
            return Ok(None);
        };
        let version = newest.version();
        if let Some(digest) = newest.description().and_then(digest_of_description) {
            return Ok(Some(Latest {
                version,
                code_sha256: digest.to_string(),
                verified: false,
            }));
        }
        let code_sha256 = self.code_sha256(name, version).await?;
        Ok(Some(Latest {
            version,
            code_sha256,
            verified: true,
        }))
    }

    /// Calls PublishLayerVersion once and returns the new version and the
    /// CodeSha256 Lambda computed.
    ///
    /// An inline zip is read here, while the caller has a concurrency
    /// slot, so memory grows with `--concurrency`, not with the pairs.
    pub async fn publish(&self, request: &PublishRequest<'_>) -> Result<Latest, Failure> {
        let content = match &request.content {
            Content::Inline(zip) => {
                let bytes = tokio::fs::read(zip)
                    .await
                    .map_err(|error| Failure::permanent(format!("cannot read {}: {error}", zip.display())))?;
                LayerVersionContentInput::builder().zip_file(Blob::new(bytes)).build()
            }
            Content::S3 { bucket, key } => LayerVersionContentInput::builder()
                .s3_bucket(bucket)
                .s3_key(key)
                .build(),
        };
        let architecture = match request.architecture {
            Arch::X86_64 => Architecture::X8664,
            Arch::Arm64 => Architecture::Arm64,
        };
        let output = self
            .lambda
            .publish_layer_version()
            .layer_name(request.name)
            .description(request.description)
            .content(content)
            .set_compatible_runtimes(Some(
                request
                    .runtimes
                    .iter()
                    .map(|runtime| Runtime::from(runtime.as_str()))
                    .collect(),
            ))
            .compatible_architectures(architecture)
            .license_info(request.license)
            .customize()
            .config_override(
                aws_sdk_lambda::config::Builder::default().timeout_config(self.upload_timeout(request.bytes)),
            )
            .send()
            .await
            .map_err(|error| Failure::from_sdk(&error))?;
        Ok(Latest {
            version: output.version(),
            code_sha256: output
                .content()
                .and_then(|content| content.code_sha256())
                .unwrap_or_default()
                .to_string(),
            verified: true,
        })
    }

    /// Lets every account read `version` of `name`, and returns whether it
    /// added the statement. An existing statement from an earlier run is
    /// not an error.
    pub async fn make_public(&self, name: &str, version: i64) -> Result<bool, Failure> {
        let result = self
            .lambda
            .add_layer_version_permission()
            .layer_name(name)
            .version_number(version)
            .statement_id(PUBLIC_STATEMENT)
            .action("lambda:GetLayerVersion")
            .principal("*")
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error) if error.code() == Some("ResourceConflictException") => Ok(false),
            Err(error) => Err(Failure::from_sdk(&error)),
        }
    }

    /// Creates `bucket` in this client's region unless this account has it.
    pub async fn ensure_bucket(&self, bucket: &str, region: &str) -> Result<(), Failure> {
        let head = self.s3.head_bucket().bucket(bucket).send().await;
        let error = match head {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        match status_of(&error) {
            Some(404) => {}
            Some(403) => {
                return Err(Failure::permanent(format!(
                    "bucket {bucket} exists but this account cannot use it (it may belong to another account): \
                     choose another --s3-bucket-prefix"
                )))
            }
            _ => return Err(Failure::from_sdk(&error)),
        }
        let mut create = self.s3.create_bucket().bucket(bucket);
        // us-east-1 is the default location and must not be named.
        if region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => Ok(()),
            Err(error) if error.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(error) if error.code() == Some("BucketAlreadyExists") => Err(Failure::permanent(format!(
                "bucket {bucket} belongs to another account: choose another --s3-bucket-prefix"
            ))),
            Err(error) => Err(Failure::from_sdk(&error)),
        }
    }

    /// Uploads `zip` to `bucket`/`key` unless the object there has the
    /// same SHA-256 checksum. S3 checks the upload against `sha256` (base64).
    /// Returns whether it uploaded.
    pub async fn upload(&self, bucket: &str, key: &str, zip: &Path, bytes: u64, sha256: &str) -> Result<bool, Failure> {
        let head = self
            .s3
            .head_object()
            .bucket(bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await;
        let present = head.is_ok_and(|head| match head.checksum_sha256() {
            Some(checksum) => checksum == sha256,
            // A store that returns no checksum, such as moto: the digest
            // this task stored with an upload that S3 checked, and the size.
            None => {
                let stored = head.metadata().and_then(|metadata| metadata.get(SHA256_METADATA));
                stored.map(String::as_str) == Some(sha256) && head.content_length() == i64::try_from(bytes).ok()
            }
        });
        if present {
            return Ok(false);
        }
        let body = ByteStream::from_path(zip)
            .await
            .map_err(|error| Failure::permanent(format!("cannot read {}: {error}", zip.display())))?;
        self.s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body)
            .checksum_sha256(sha256)
            .metadata(SHA256_METADATA, sha256)
            .customize()
            .config_override(aws_sdk_s3::config::Builder::default().timeout_config(self.upload_timeout(bytes)))
            .send()
            .await
            .map_err(|error| Failure::from_sdk(&error))?;
        Ok(true)
    }

    /// Returns the CodeSha256 Lambda computed for `version` of `name`.
    pub async fn code_sha256(&self, name: &str, version: i64) -> Result<String, Failure> {
        let details = self
            .lambda
            .get_layer_version()
            .layer_name(name)
            .version_number(version)
            .send()
            .await
            .map_err(|error| Failure::from_sdk(&error))?;
        Ok(details
            .content()
            .and_then(|content| content.code_sha256())
            .unwrap_or_default()
            .to_string())
    }

    /// Fails with one clear message when no credentials can be found, before
    /// any pair starts and reports it as a connection failure.
    pub async fn check_credentials(config: &aws_config::SdkConfig, profile: Option<&str>) -> anyhow::Result<()> {
        use aws_sdk_lambda::config::ProvideCredentials as _;
        let provider = config
            .credentials_provider()
            .ok_or_else(|| anyhow::anyhow!("no AWS credentials provider is configured"))?;
        provider.provide_credentials().await.map_err(|error| match profile {
            Some(profile) => anyhow::anyhow!(
                "cannot load the credentials of AWS profile {profile:?}. Check the name (`aws configure \
                 list-profiles` lists them) and sign in if it uses SSO. The profile provider reported:\n{}",
                innermost(&error)
            ),
            None => anyhow::anyhow!(
                "no usable AWS credentials. Set AWS_PROFILE or --profile, or AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY. The credential providers reported:\n{}",
                innermost(&error)
            ),
        })?;
        Ok(())
    }
}

/// The newest version of a layer and its content digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    pub version: i64,
    /// Base64 sha256 of the zip, as Lambda's `CodeSha256`.
    pub code_sha256: String,
    /// Whether `code_sha256` comes from Lambda itself, not from the
    /// version's description.
    pub verified: bool,
}

/// Parameters of a PublishLayerVersion call.
pub struct PublishRequest<'a> {
    pub name: &'a str,
    pub description: &'a str,
    pub architecture: Arch,
    pub runtimes: &'a [String],
    pub license: &'a str,
    pub content: Content,
    pub bytes: u64,
}

/// Source of the zip: the request itself, or an S3 object.
pub enum Content {
    Inline(PathBuf),
    S3 { bucket: String, key: String },
}

/// Returns the digest this task wrote at the end of a description.
pub fn digest_of_description(description: &str) -> Option<&str> {
    let (_, digest) = description.rsplit_once(DIGEST_MARKER)?;
    // A base64 sha256 is 44 characters.
    (digest.len() == 44 && !digest.contains(' ')).then_some(digest)
}

/// A failed request: whether another attempt may succeed, what to tell
/// the user, and how long the service asked to wait.
#[derive(Debug, Clone)]
pub struct Failure {
    pub retryable: bool,
    /// The attempt ran out of time: the request may still be running.
    pub timed_out: bool,
    pub message: String,
    /// Lambda's or S3's error code, such as `TooManyRequestsException`.
    pub code: Option<String>,
    pub retry_after: Option<Duration>,
}

impl Failure {
    pub fn permanent(message: String) -> Failure {
        Failure {
            retryable: false,
            timed_out: false,
            message,
            code: None,
            retry_after: None,
        }
    }

    /// Throttling, server errors, timeouts and broken connections are worth
    /// another attempt; access and validation errors are not.
    pub fn from_sdk<E>(error: &SdkError<E, HttpResponse>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let mut failure = Failure::permanent(String::new());
        match error {
            SdkError::TimeoutError(_) => {
                failure.retryable = true;
                failure.timed_out = true;
                failure.message =
                    "the attempt timed out: its limit is --timeout, plus 1 s per 256 KiB uploaded".to_string();
            }
            SdkError::DispatchFailure(dispatch) => {
                failure.retryable = !dispatch.is_user();
                failure.message = format!("connection failed: {}", innermost(error));
            }
            SdkError::ResponseError(_) => {
                failure.retryable = true;
                failure.message = format!("incomplete or invalid response: {}", innermost(error));
            }
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let code = service.err().code().unwrap_or("unknown error");
                failure.retryable = status == 429
                    || status >= 500
                    || matches!(
                        code,
                        "TooManyRequestsException" | "ThrottlingException" | "ServiceException" | "SlowDown"
                    );
                failure.message = format!(
                    "{code} (HTTP {status}): {}",
                    service.err().message().unwrap_or("no message")
                );
                failure.code = Some(code.to_string());
                failure.retry_after = service
                    .raw()
                    .headers()
                    .get("retry-after")
                    .and_then(|value| value.trim().parse::<u64>().ok())
                    .map(|seconds| Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
            }
            other => failure.message = DisplayErrorContext(other).to_string(),
        }
        failure
    }
}

/// Returns the last cause in the chain of `error`, such as "Connection reset by
/// peer (os error 104)": the layers above it only repeat that the request
/// failed.
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Returns the HTTP status of a failed request, when a response came.
fn status_of<E>(error: &SdkError<E, HttpResponse>) -> Option<u16> {
    error.raw_response().map(|response| response.status().as_u16())
}

/// Time to wait after failed attempt `attempt`: exponential backoff with
/// jitter, between half and all of 0.5 s, 1 s, 2 s, 4 s (at most 8 s), and
/// at least the `Retry-After` of the response.
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let ceiling = 250u64 << attempt.clamp(1, 5);
    let jittered = Duration::from_millis(ceiling / 2 + random_below(ceiling / 2 + 1));
    retry_after.map_or(jittered, |asked| asked.max(jittered))
}

/// Returns a number below `bound`, from the clock: jitter needs no better
/// source.
fn random_below(bound: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |time| u64::from(time.subsec_nanos()));
    // Mix the bits so that calls close in time still spread.
    nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) % bound.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_read_from_the_description() {
        let digest = "WxXM2VIEJJXh2yLq1+sXrYdX+evHMKDv/b7I/Lw9XOE=";
        assert_eq!(
            digest_of_description(&format!(
                "PHP 8.2.32 for event-driven Lambda functions, sha256 {digest}"
            )),
            Some(digest)
        );
        assert_eq!(digest_of_description("PHP 8.2 by someone else"), None);
        assert_eq!(digest_of_description("sha256 short"), None);
    }

    #[test]
    fn backoff_grows_and_honours_retry_after() {
        for attempt in 1..10 {
            let wait = backoff(attempt, None);
            let ceiling = Duration::from_millis(250 << attempt.clamp(1, 5));
            assert!(wait <= ceiling, "attempt {attempt}: {wait:?}");
            assert!(wait >= ceiling / 2, "attempt {attempt}: {wait:?}");
        }
        assert!(backoff(1, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
    }
}
