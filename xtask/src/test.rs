//! `cargo xtask test`: builds the layers, then runs every test of the
//! workspace, the acceptance tests of the built layers included.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::build_layers;
use crate::build_root::{self, BuildRoot, RootRecipe};
use crate::flags::{Arch, TestArgs, TestStage};
use crate::matrix::Definitions;
use crate::{host, project_root};

/// Environment variable that points the acceptance tests at the zips.
pub const DIST_DIR_VAR: &str = "LAYERS_DIST_DIR";

/// Environment variable that points the acceptance tests at the build cache.
pub const CACHE_DIR_VAR: &str = "LAYERS_CACHE_DIR";

/// Environment variable prefix that points the acceptance tests at the
/// build root of an architecture (`LAYERS_BUILD_ROOT_X86_64`), whose glibc
/// the isolated test roots use.
pub const BUILD_ROOT_VAR_PREFIX: &str = "LAYERS_BUILD_ROOT_";

/// Environment variable prefix that points the acceptance tests at the
/// shell that replaces the base image's `/bin/sh` on an architecture
/// (`LAYERS_TEST_SHELL_ARM64`): /opt/bootstrap is a shell script.
pub const TEST_SHELL_VAR_PREFIX: &str = "LAYERS_TEST_SHELL_";

pub fn run(args: &TestArgs) -> Result<()> {
    if args.stage == Some(TestStage::Php) {
        return check_php(args);
    }
    let project = project_root();
    if !args.no_build {
        build_layers::run(&args.build)?;
    }

    let dist = args.build.common.out_dir(&project);
    let cache = args.build.common.cache_dir(&project);
    let definitions = Definitions::load(&project.join("layers"))?;
    let manifest_path = dist.join(build_layers::MANIFEST_NAME);
    if !manifest_path.is_file() {
        bail!(
            "no {} in {}: build the layers first, or run `cargo xtask test` without --no-build",
            build_layers::MANIFEST_NAME,
            dist.display()
        );
    }
    let manifest: build_layers::Manifest = serde_json::from_str(&std::fs::read_to_string(&manifest_path)?)
        .with_context(|| format!("invalid {}", manifest_path.display()))?;
    let host = build_root::host_arch()?;
    if manifest.layers.iter().any(|layer| layer.architecture == Arch::Arm64) && host != Arch::Arm64 {
        host::ensure(&[host::QEMU_AARCH64])?;
    }

    // The zips as they are now: a pass is recorded only for these bytes.
    let tested: BTreeMap<String, String> = manifest
        .layers
        .iter()
        .map(|layer| Ok((layer.name.clone(), crate::sources::sha256_file(&dist.join(&layer.zip))?)))
        .collect::<Result<_>>()?;

    let sh = Shell::new()?;
    sh.change_dir(&project);
    let filters = &args.filters;
    let mut command = cmd!(sh, "cargo test --workspace -- --include-ignored {filters...}");
    for (key, value) in environment(&definitions, &dist, &cache)? {
        command = command.env(key, value);
    }
    // The tests run this very program for `cargo xtask publish`, rather
    // than `cargo run`, which may build it again with other features.
    command = command.env(XTASK_VAR, std::env::current_exe()?);
    command.run().context("the tests failed")?;
    eprintln!("test: every test passed");
    if filters.is_empty() {
        let recorded = build_layers::record_acceptance(&dist, &tested)?;
        eprintln!(
            "test: recorded the pass for {recorded} zips in {}; `cargo xtask publish` requires it",
            manifest_path.display()
        );
    } else {
        eprintln!("test: filters given, so the pass is not recorded as the layers' acceptance test");
    }
    Ok(())
}

/// `--stage php`: compiles the selected cells, or takes them from the
/// cache, and checks their binaries without assembling layers.
fn check_php(args: &TestArgs) -> Result<()> {
    if !args.filters.is_empty() || args.no_build || args.build.until.is_some() {
        bail!("--stage php takes no test filters, --no-build or --until: it builds until php itself");
    }
    let mut build_args = args.build.clone();
    build_args.until = Some(crate::stage::Stage::Php);
    let built = build_layers::run(&build_args)?;
    let definitions = Definitions::load(&project_root().join("layers"))?;
    let mut failures = Vec::new();
    for cell in &built.compiled {
        let release = &definitions.php[&cell.release];
        match crate::php_check::check(&definitions, release, &cell.build, &cell.root, cell.cross) {
            Ok(summary) => eprintln!("test: {summary}"),
            Err(error) => {
                eprintln!("test: php {} ({}) failed: {error:#}", release.version, cell.arch);
                failures.push(format!("{} ({})", release.version, cell.arch));
            }
        }
    }
    if !failures.is_empty() {
        bail!("the php checks failed for {}", failures.join(", "));
    }
    let count = built.compiled.len();
    eprintln!(
        "test: the php checks passed for {count} {}",
        if count == 1 { "build" } else { "builds" }
    );
    Ok(())
}

/// Environment variable naming the xtask program for the tests that run
/// `cargo xtask` tasks.
pub const XTASK_VAR: &str = "LAYERS_XTASK";

/// Returns the variables that point the acceptance tests at the zips, the
/// cache, and the build root and test shell of each architecture.
pub fn environment(definitions: &Definitions, dist: &Path, cache: &Path) -> Result<Vec<(String, PathBuf)>> {
    let host = build_root::host_arch()?;
    let mut variables = vec![
        (DIST_DIR_VAR.to_string(), dist.to_path_buf()),
        (CACHE_DIR_VAR.to_string(), cache.to_path_buf()),
        (MOTO_SERVER_VAR.to_string(), moto_server(cache)?),
    ];
    for arch in Arch::ALL {
        let recipe = RootRecipe::new(&definitions.build_root, definitions.target(*arch), host)?;
        if let Some(root) = build_root::find(&recipe, cache) {
            let name = arch.lambda_name().to_uppercase();
            variables.push((format!("{BUILD_ROOT_VAR_PREFIX}{name}"), root.path.clone()));
            variables.push((format!("{TEST_SHELL_VAR_PREFIX}{name}"), test_shell(&root, cache)?));
        }
    }
    Ok(variables)
}

/// Environment variable that names the `moto_server` program for the
/// publish tests.
pub const MOTO_SERVER_VAR: &str = "LAYERS_MOTO_SERVER";

/// Version of moto the publish tests run against.
const MOTO_VERSION: &str = "5.2.*";

/// Installs moto from PyPI into a virtual environment in the cache, once,
/// and returns its `moto_server`. A virtual environment records its own
/// path, so it is made in place, and a marker written last tells a
/// finished one from an interrupted one.
pub fn moto_server(cache: &Path) -> Result<PathBuf> {
    let venv = cache.join("moto");
    let server = venv.join("bin/moto_server");
    let marker = venv.join(".installed");
    if marker.is_file() {
        return Ok(server);
    }
    host::ensure(&[host::PYTHON3])?;
    let log = cache.join("logs").join("moto.log");
    eprintln!(
        "moto: installing moto[server] {MOTO_VERSION} from PyPI into {}, for the publish tests and benchmark",
        venv.display()
    );
    if venv.exists() {
        fs::remove_dir_all(&venv)?;
    }
    let mut create = std::process::Command::new("python3");
    create.arg("-m").arg("venv").arg(&venv);
    crate::process::run_logged(create, &log)?;
    let mut install = std::process::Command::new(venv.join("bin/pip"));
    install
        .args(["install", "--quiet"])
        .arg(format!("moto[server]=={MOTO_VERSION}"));
    crate::process::run_logged(install, &log)?;
    fs::write(&marker, MOTO_VERSION)?;
    Ok(server)
}

/// Returns Debian's dash for the architecture of `root`, downloaded once
/// into the cache. Lambda's base image has a `/bin/sh`, and the test roots
/// need one of the layer's own architecture to run /opt/bootstrap.
fn test_shell(root: &BuildRoot, cache: &Path) -> Result<PathBuf> {
    let root_name = root.path.file_name().context("the build root has no name")?;
    let shell = cache.join("test-shells").join(root_name).join("sh");
    if shell.is_file() {
        return Ok(shell);
    }
    let log = cache.join("logs").join(format!("test-shell-{}.log", root.arch));
    let work = "/var/tmp/test-shell";
    let script = format!(
        "rm -rf {work} && mkdir -p {work} && cd {work} && apt-get download --quiet dash:{arch} && dpkg-deb -x dash_*.deb tree",
        arch = root.arch.debian_name()
    );
    eprintln!("test: downloading dash for the {} test roots", root.arch);
    root.command("sh")
        .args(["-c", &script])
        .network(true)
        .run_logged(&log)?;

    let extracted = root.path.join(work.trim_start_matches('/')).join("tree/bin/dash");
    let directory = shell.parent().context("the shell path has no parent")?;
    fs::create_dir_all(directory)?;
    let partial = crate::process::partial_path(&shell);
    fs::copy(&extracted, &partial)
        .with_context(|| format!("cannot copy {} to {}", extracted.display(), partial.display()))?;
    fs::rename(&partial, &shell)?;
    fs::remove_dir_all(root.path.join(work.trim_start_matches('/')))?;
    Ok(shell)
}
