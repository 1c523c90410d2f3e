//! The `manifest.json` that `cargo xtask build-layers` writes beside the zips.

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Environment variable naming the directory of the zips; `cargo xtask
/// test` sets it.
pub const DIST_DIR_VAR: &str = "LAYERS_DIST_DIR";

/// Environment variable naming the build cache; `cargo xtask test` sets it.
pub const CACHE_DIR_VAR: &str = "LAYERS_CACHE_DIR";

#[derive(Debug, Deserialize)]
pub struct Manifest {
    pub layers: Vec<Layer>,
}

/// A built layer, as described by the manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Layer {
    pub name: String,
    pub kind: String,
    pub architecture: String,
    pub php_version: String,
    pub glibc_max: String,
    pub ld_library_path: String,
    pub loader: String,
    pub zip: String,
    pub sha256: String,
    pub modules: Modules,
    pub disabled_extensions: BTreeMap<String, String>,
    pub libraries: Vec<Library>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Modules {
    pub php: Vec<String>,
    pub zend: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Library {
    pub soname: String,
    pub file: String,
    pub shadows_base_image: bool,
}

/// Returns the workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Returns the directory of the built zips: `$LAYERS_DIST_DIR`, else dist/.
pub fn dist_dir() -> PathBuf {
    env::var_os(DIST_DIR_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("dist"))
}

impl Manifest {
    /// Reads the manifest of the built layers.
    ///
    /// # Panics
    /// When there is none: these tests need built layers, which `cargo
    /// xtask test` builds first.
    pub fn load() -> Manifest {
        let path = dist_dir().join("manifest.json");
        let text = fs::read_to_string(&path).unwrap_or_else(|error| {
            panic!(
                "no built layers: cannot read {} ({error}); run `cargo xtask test`, which builds them first",
                path.display()
            )
        });
        let manifest: Manifest =
            serde_json::from_str(&text).unwrap_or_else(|error| panic!("invalid {}: {error}", path.display()));
        assert!(!manifest.layers.is_empty(), "{} lists no layer", path.display());
        manifest
    }

    /// Layers of the given kind.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Layer> + 'a {
        self.layers.iter().filter(move |layer| layer.kind == kind)
    }
}

impl Layer {
    pub fn zip_path(&self) -> PathBuf {
        dist_dir().join(&self.zip)
    }
}

/// Environment variable naming the xtask program; `cargo xtask test`
/// sets it to itself.
pub const XTASK_VAR: &str = "LAYERS_XTASK";

/// Returns the command that runs `cargo xtask TASK` in the workspace: the
/// program in `$LAYERS_XTASK`, else `cargo run` with the cargo that runs
/// the tests.
pub fn xtask(task: &str) -> std::process::Command {
    if let Some(program) = env::var_os(XTASK_VAR) {
        let mut command = std::process::Command::new(program);
        command.current_dir(workspace_root()).arg(task);
        return command;
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command
        .current_dir(workspace_root())
        .args(["run", "--quiet", "--package", "xtask", "--", task]);
    command
}
