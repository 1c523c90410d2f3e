//! Command-line flags of every task.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build and test the PHP layers for AWS Lambda"
)]
pub struct Xtask {
    #[command(subcommand)]
    pub task: Task,
}

#[derive(Subcommand, Debug)]
pub enum Task {
    /// Compile PHP in a Debian build root and write the layer zips and
    /// manifest.json to the output directory.
    BuildLayers(BuildLayersArgs),
    /// Build the layers (unless --no-build), then run the workspace tests and
    /// the acceptance tests of every built layer.
    Test(TestArgs),
    /// Measure the compile of PHP for x86_64 and arm64, the runtimes, the
    /// build pipeline and publishing, and write the figures with the layer
    /// sizes to BENCHMARKS.md. The compile alone takes about 11 minutes on 2
    /// cores; --only picks parts.
    Bench(BenchArgs),
    /// Publish the zips in the output directory as Lambda layer versions in
    /// several regions, in parallel, and record the versions in layers.json.
    /// A layer whose latest version has the same content is left alone.
    Publish(PublishArgs),
}

#[derive(Args, Debug, Clone)]
pub struct BuildLayersArgs {
    /// PHP version to build, as major.minor (a file layers/php/<VERSION>.toml).
    /// Repeat the flag for several. [default: the versions whose file sets
    /// build_by_default = true]
    #[arg(long = "php", value_name = "VERSION")]
    pub php: Vec<PhpMinor>,

    /// CPU architecture to build for. Repeat the flag for several. arm64
    /// also compiles x86_64 PHP, whose configure results the arm64 build
    /// is checked against. [default: x86_64 and arm64]
    #[arg(long = "arch", value_enum, value_name = "ARCH")]
    pub arch: Vec<Arch>,

    /// Layer kind to build. Repeat the flag for several. [default: all kinds]
    #[arg(long = "layer", value_enum, value_name = "KIND")]
    pub layer: Vec<LayerKind>,

    /// Stop after this stage: `--until php` fetches, prepares the roots and
    /// compiles, and assembles no layer.
    #[arg(long, value_enum, value_name = "STAGE")]
    pub until: Option<crate::stage::Stage>,

    /// Build this stage and every later one again, even when their inputs
    /// did not change: `--force layers` assembles and zips the layers again
    /// without compiling. The x86_64 build that arm64 is checked against
    /// is only rebuilt when x86_64 is selected too.
    #[arg(long, value_enum, value_name = "STAGE")]
    pub force: Option<crate::stage::Stage>,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Locations and settings shared by the tasks that build.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Directory of the zips and manifest.json: where build-layers writes
    /// them and where test and bench read them.
    /// [default: dist/ in the workspace]
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,

    /// Directory for downloaded sources, build roots and compiled PHP trees,
    /// reused across runs. [default: cache/ in the workspace]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Debian mirror (a URL such as http://HOST/debian) for the build root
    /// and for Debian source packages. [default: the mirror of the host's
    /// apt configuration]
    #[arg(long, value_name = "URL")]
    pub debian_mirror: Option<String>,

    /// Parallel jobs for `make`, shared out among the PHP versions that
    /// compile at once (one version per job at most), and the threads that
    /// resolve library closures and compress zips. [default: the number of
    /// CPUs]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,

    /// Take PHP sources only from the sources directory (cache/sources)
    /// and the Debian mirror, never from the URLs under layers/php/.
    #[arg(long)]
    pub no_release_urls: bool,
}

#[derive(Args, Debug)]
pub struct TestArgs {
    /// Test the zips already in the output directory (--out-dir) instead
    /// of building them first. The acceptance tests cover every layer in
    /// manifest.json, whatever --php, --arch and --layer select.
    #[arg(long)]
    pub no_build: bool,

    #[command(flatten)]
    pub build: BuildLayersArgs,

    /// Check one stage instead of running every test: `--stage php`
    /// compiles the selected cells (or takes them from the cache) and runs
    /// their php and php-fpm inside the build root, without assembling
    /// layers: the release, and `php -m` against extensions.toml.
    #[arg(long, value_enum, value_name = "STAGE")]
    pub stage: Option<TestStage>,

    /// Only run the tests whose names contain one of these strings, as
    /// `cargo test` filters them (`cargo xtask test -- fpm_runtime`).
    #[arg(last = true, value_name = "FILTER")]
    pub filters: Vec<String>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// PHP version to compile, as major.minor. [default: the newest of the
    /// versions whose file sets build_by_default = true]
    #[arg(long = "php", value_name = "VERSION")]
    pub php: Option<PhpMinor>,

    /// Run only this benchmark; repeat the flag for several. The other
    /// sections of BENCHMARKS.md are kept. `runtime` needs built layers.
    /// [default: all]
    #[arg(long = "only", value_enum, value_name = "BENCHMARK")]
    pub only: Vec<Benchmark>,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Regions to publish to, separated by commas, or `all` for every
    /// region in layers/regions.toml.
    #[arg(long, value_delimiter = ',', required = true, value_name = "REGIONS")]
    pub regions: Vec<String>,

    /// Publish only the layers of this PHP version (major.minor). Repeat
    /// for several.
    #[arg(long = "php", value_name = "VERSION")]
    pub php: Vec<PhpMinor>,

    /// Publish only the layers of this architecture. Repeat for several.
    #[arg(long = "arch", value_enum, value_name = "ARCH")]
    pub arch: Vec<Arch>,

    /// Publish only the layers of this kind. Repeat for several.
    #[arg(long = "layer", value_enum, value_name = "KIND")]
    pub layer: Vec<LayerKind>,

    /// Text put before every layer name, to publish under your own names.
    #[arg(long, default_value = "", hide_default_value = true, value_name = "PREFIX")]
    pub layer_prefix: String,

    /// Do not make the versions publicly readable. The version table
    /// lists public versions only, so a private run writes none.
    #[arg(long)]
    pub private: bool,

    /// Print what would be published, calling only read APIs.
    #[arg(long)]
    pub dry_run: bool,

    /// Publish zips whose acceptance test has not passed (`cargo xtask
    /// test` records a pass in manifest.json).
    #[arg(long)]
    pub skip_tests_check: bool,

    /// Requests in flight at once. Each publish request carries a whole
    /// zip, so a few uploads already fill a laptop's uplink. 8 keeps the
    /// line busy while other requests wait for Lambda's responses.
    #[arg(long, default_value_t = 8, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// Seconds an attempt of a request may take before it is abandoned and
    /// tried again. Uploads get one more second per 256 KiB of zip.
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,

    /// Bucket name prefix for zips over 50 MB, which Lambda only takes
    /// from S3: the bucket of each region is PREFIX-REGION, created when
    /// missing.
    #[arg(long, value_name = "PREFIX")]
    pub s3_bucket_prefix: Option<String>,

    /// AWS profile for the credentials. [default: the usual AWS variables and files]
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,

    /// AWS endpoint to call instead of AWS's, for Lambda and S3, such as a
    /// local emulator.
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// The version table to update. Its entries are taken as public
    /// versions. [default: layers.json in the project]
    #[arg(long, value_name = "FILE")]
    pub table: Option<PathBuf>,

    /// Print the summary as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Directory of the zips and manifest.json to publish.
    /// [default: dist/ in the workspace]
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// A stage `cargo xtask test --stage` can check alone.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestStage {
    /// The compiled php and php-fpm.
    Php,
}

/// A part of `cargo xtask bench`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Benchmark {
    /// Compiling PHP for x86_64 and arm64 (about 15 minutes on 2 cores).
    Compile,
    /// Cold start and warm overhead of the function and FPM runtimes.
    Runtime,
    /// A no-op build-layers, the library closure against ldd, and the
    /// layer zips against Info-ZIP.
    Build,
    /// `cargo xtask publish` against moto through a proxy with added
    /// latency: time against the ideal, and requests per layer and region.
    Publish,
}

impl BenchArgs {
    /// Returns whether `benchmark` runs in this invocation.
    pub fn runs(&self, benchmark: Benchmark) -> bool {
        self.only.is_empty() || self.only.contains(&benchmark)
    }
}

impl CommonArgs {
    /// Returns the output directory, absolute.
    pub fn out_dir(&self, project: &Path) -> PathBuf {
        absolute(self.out_dir.clone().unwrap_or_else(|| project.join("dist")))
    }

    /// Returns the cache directory, absolute.
    pub fn cache_dir(&self, project: &Path) -> PathBuf {
        absolute(self.cache_dir.clone().unwrap_or_else(|| project.join("cache")))
    }

    /// Returns the number of `make` jobs.
    pub fn jobs(&self) -> usize {
        match self.jobs {
            Some(jobs) => jobs as usize,
            None => std::thread::available_parallelism().map_or(1, |count| count.get()),
        }
    }
}

pub fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

/// A target CPU architecture, named as Lambda names it.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Arch {
    #[value(name = "x86_64")]
    #[serde(rename = "x86_64")]
    X86_64,
    #[value(name = "arm64")]
    #[serde(rename = "arm64")]
    Arm64,
}

impl Arch {
    pub const ALL: &'static [Arch] = &[Arch::X86_64, Arch::Arm64];

    /// Lambda's name of the architecture (`x86_64`, `arm64`).
    pub fn lambda_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Debian's name of the architecture (`amd64`, `arm64`).
    pub fn debian_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.lambda_name())
    }
}

/// A layer kind: what the layer's bootstrap runs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// php and the function runtime, for event handlers.
    Function,
    /// php, php-fpm and the FPM runtime, for HTTP applications.
    Fpm,
}

impl LayerKind {
    pub const ALL: &'static [LayerKind] = &[LayerKind::Function, LayerKind::Fpm];

    /// Returns the kind's name in layers/kinds.toml and in manifest.json.
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Function => "function",
            LayerKind::Fpm => "fpm",
        }
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A PHP release series, major.minor (`8.2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhpMinor {
    pub major: u8,
    pub minor: u8,
}

impl PhpMinor {
    /// The version without its dot, as layer names use it (`82`).
    pub fn short(self) -> String {
        format!("{}{}", self.major, self.minor)
    }
}

impl FromStr for PhpMinor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid PHP version {text:?}: expected major.minor, such as 8.2");
        let (major, minor) = text.split_once('.').ok_or_else(invalid)?;
        Ok(PhpMinor {
            major: major.parse().map_err(|_| invalid())?,
            minor: minor.parse().map_err(|_| invalid())?,
        })
    }
}

impl fmt::Display for PhpMinor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Xtask::command().debug_assert();
    }

    #[test]
    fn php_minor_parses() {
        assert_eq!("8.2".parse::<PhpMinor>(), Ok(PhpMinor { major: 8, minor: 2 }));
        assert_eq!(PhpMinor { major: 8, minor: 2 }.short(), "82");
    }

    #[test]
    fn php_minor_rejects_full_version() {
        let error = "8.2.32".parse::<PhpMinor>().unwrap_err();
        assert!(error.contains("major.minor"), "{error}");
        assert!("eight".parse::<PhpMinor>().is_err());
    }

    #[test]
    fn zero_jobs_are_rejected() {
        let error = Xtask::try_parse_from(["cargo xtask", "build-layers", "--jobs", "0"]).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn arch_accepts_lambda_names() {
        let flags = Xtask::try_parse_from(["cargo xtask", "build-layers", "--arch", "arm64"]).unwrap();
        let Task::BuildLayers(args) = flags.task else {
            panic!("expected build-layers")
        };
        assert_eq!(args.arch, vec![Arch::Arm64]);
    }
}
