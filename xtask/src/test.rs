//! `cargo xtask test`: builds the layers, then runs every test of the
//! workspace, the acceptance tests of the built layers included.

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::build_layers;
use crate::build_root::{self, RootRecipe};
use crate::flags::{Arch, TestArgs};
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

pub fn run(args: &TestArgs) -> Result<()> {
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

    let sh = Shell::new()?;
    sh.change_dir(&project);
    let mut command = cmd!(sh, "cargo test --workspace -- --include-ignored")
        .env(DIST_DIR_VAR, &dist)
        .env(CACHE_DIR_VAR, &cache);
    for arch in Arch::ALL {
        let recipe = RootRecipe::new(&definitions.build_root, definitions.target(*arch), host)?;
        if let Some(root) = build_root::find(&recipe, &cache) {
            let variable = format!("{BUILD_ROOT_VAR_PREFIX}{}", arch.lambda_name().to_uppercase());
            command = command.env(variable, &root.path);
        }
    }
    command.run().context("the tests failed")?;
    eprintln!("test: every test passed");
    Ok(())
}
