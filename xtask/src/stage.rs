//! The stages of `cargo xtask build-layers`, and the input key of the layer
//! stage (closure, assembly and zip), which lets an unchanged layer be
//! taken from the output directory instead of being built again.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use clap::ValueEnum;
use sha2::{Digest, Sha256};

/// A stage of the build, in the order they run.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Fetching and verifying the PHP source tarballs.
    Sources,
    /// Creating the Debian build roots.
    Root,
    /// Compiling PHP.
    Php,
    /// Collecting the library closure, assembling the layers and zipping them.
    Layers,
}

impl std::fmt::Display for Stage {
    /// Writes the stage as the flags spell it, such as `php`.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = self.to_possible_value().expect("every stage is a flag value");
        formatter.write_str(value.get_name())
    }
}

/// Version of the layer stage's own logic. Change it when a change to the
/// closure, assembly or zip code changes what a layer contains, so that
/// layers built by the older code are not reused.
const LAYER_STAGE_VERSION: &str = "1";

/// Inputs of the layer stage, apart from the compiled PHP itself.
pub struct LayerInputs<'a> {
    /// The `layers/` directory: kinds, extensions and targets.
    pub layers_dir: &'a Path,
    /// The `runtime/` directory: bootstraps, runtimes, ini files.
    pub runtime_dir: &'a Path,
    /// Paths under `runtime_dir` of the files that the layer ships. Other
    /// files there, such as its README, are not inputs.
    pub runtime_files: &'a [&'a Path],
    /// Identity of the compiled PHP: see [`identity`].
    pub build_name: &'a str,
    /// Identity of the build root: see [`identity`].
    pub root_name: &'a str,
    pub kind: &'a str,
    pub arch: &'a str,
}

/// Name of the file that marks a finished build root or compiled PHP,
/// written last.
pub const READY_MARKER: &str = ".php-lambda-layers-ready";

/// Returns the identity of a finished build root or compiled PHP: its
/// directory name, which carries its input key, and the time its ready
/// marker was written. A directory built again under the same name (after
/// `--force root`, or removed by hand) gets another identity, so that the
/// layers built from the older one are not kept.
pub fn identity(dir: &Path) -> Result<String> {
    let marker = dir.join(READY_MARKER);
    let written = fs::metadata(&marker)
        .and_then(|metadata| metadata.modified())
        .with_context(|| format!("cannot read {}", marker.display()))?;
    let nanos = written
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    Ok(format!("{name}@{nanos}"))
}

/// Returns the key of a layer: a hash of every file it is assembled from
/// and of the stage's version. Any change in them gives another key.
pub fn layer_key(inputs: &LayerInputs) -> Result<String> {
    let mut hasher = Sha256::new();
    for part in [
        LAYER_STAGE_VERSION,
        inputs.build_name,
        inputs.root_name,
        inputs.kind,
        inputs.arch,
    ] {
        hasher.update(part.as_bytes());
        hasher.update(b"\0");
    }
    for file in ["kinds.toml", "extensions.toml"] {
        hash_tree(&mut hasher, inputs.layers_dir, Path::new(file))?;
    }
    hash_tree(&mut hasher, inputs.layers_dir, Path::new("targets"))?;
    for file in inputs.runtime_files {
        if inputs.runtime_dir.join(file).exists() {
            hash_tree(&mut hasher, inputs.runtime_dir, file)?;
        } else {
            // The assembly fails on a missing file and names it.
            hasher.update(file.as_os_str().as_encoded_bytes());
            hasher.update(b"\0missing\0");
        }
    }
    Ok(crate::sources::hex(&hasher.finalize()[..8]))
}

/// Adds `relative` under `base` to the hash: for a file its path, mode and
/// content, for a symbolic link its target, for a directory its entries in
/// name order.
fn hash_tree(hasher: &mut Sha256, base: &Path, relative: &Path) -> Result<()> {
    let path = base.join(relative);
    let metadata = fs::symlink_metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
    hasher.update(relative.as_os_str().as_encoded_bytes());
    hasher.update(b"\0");
    if metadata.is_symlink() {
        hasher.update(b"link\0");
        hasher.update(fs::read_link(&path)?.as_os_str().as_encoded_bytes());
    } else if metadata.is_dir() {
        let mut names: Vec<_> = fs::read_dir(&path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            hash_tree(hasher, base, &relative.join(name))?;
        }
    } else {
        hasher.update(format!("file {:o}\0", metadata.permissions().mode() & 0o777).as_bytes());
        hasher.update(fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?);
    }
    hasher.update(b"\0");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::LayerKind;

    /// Copies `from` into `to`, files and directories only.
    fn copy_tree(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_tree(&entry.path(), &target);
            } else {
                fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    #[test]
    fn identity_changes_when_rebuilt() {
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("bullseye-amd64-cec0119e06d6");
        fs::create_dir(&dir).unwrap();
        assert!(identity(&dir).is_err(), "an unfinished directory has an identity");
        fs::write(dir.join(READY_MARKER), "first").unwrap();
        let first = identity(&dir).unwrap();
        assert!(first.starts_with("bullseye-amd64-cec0119e06d6@"), "{first}");
        assert_eq!(identity(&dir).unwrap(), first);

        // Built again under the same name: the marker is written anew.
        fs::remove_dir_all(&dir).unwrap();
        fs::create_dir(&dir).unwrap();
        let marker = fs::File::create(dir.join(READY_MARKER)).unwrap();
        marker
            .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(1))
            .unwrap();
        assert_ne!(identity(&dir).unwrap(), first);
    }

    #[test]
    fn layer_key_follows_every_input() {
        let project = crate::project_root();
        let work = tempfile::tempdir().unwrap();
        let (layers, runtime) = (work.path().join("layers"), work.path().join("runtime"));
        copy_tree(&project.join("layers"), &layers);
        copy_tree(&project.join("runtime"), &runtime);
        let definitions = crate::matrix::Definitions::load(&layers).unwrap();
        let function_files = definitions.runtime_files(LayerKind::Function);
        let fpm_files = definitions.runtime_files(LayerKind::Fpm);
        let inputs = LayerInputs {
            layers_dir: &layers,
            runtime_dir: &runtime,
            runtime_files: &function_files,
            build_name: "php-8.2.32-x86_64-4f1aa6ab1208",
            root_name: "bullseye-amd64-cec0119e06d6",
            kind: "function",
            arch: "x86_64",
        };
        let key = layer_key(&inputs).unwrap();
        assert_eq!(layer_key(&inputs).unwrap(), key, "the same inputs gave another key");

        let shipped = runtime.join("php/conf.d/10-layer.ini");
        let text = fs::read_to_string(&shipped).unwrap();
        fs::write(&shipped, format!("{text}memory_limit = 256M\n")).unwrap();
        assert_ne!(
            layer_key(&inputs).unwrap(),
            key,
            "an edited shipped ini file kept the key"
        );
        fs::write(&shipped, text).unwrap();
        assert_eq!(layer_key(&inputs).unwrap(), key);

        // Files that the function layer does not ship are not its inputs.
        fs::write(runtime.join("function/layer-test.ini"), "memory_limit = 256M\n").unwrap();
        let readme = runtime.join("README.md");
        fs::write(&readme, "edited\n").unwrap();
        assert_eq!(
            layer_key(&inputs).unwrap(),
            key,
            "a file the layer does not ship changed the key"
        );
        let fpm_inputs = LayerInputs {
            runtime_files: &fpm_files,
            kind: "fpm",
            ..inputs
        };
        let fpm_key = layer_key(&fpm_inputs).unwrap();
        let fastcgi = runtime.join("fpm/fastcgi.php");
        let text = fs::read_to_string(&fastcgi).unwrap();
        fs::write(&fastcgi, format!("{text}// edited\n")).unwrap();
        assert_eq!(
            layer_key(&inputs).unwrap(),
            key,
            "an fpm-only file changed the function key"
        );
        assert_ne!(
            layer_key(&fpm_inputs).unwrap(),
            fpm_key,
            "an edited fpm runtime file kept the fpm key"
        );

        // A missing shipped file still gives a key. The assembly then fails
        // and names the file.
        fs::remove_file(runtime.join("function/function.php")).unwrap();
        assert_ne!(layer_key(&inputs).unwrap(), key, "a missing shipped file kept the key");
        copy_tree(&project.join("runtime"), &runtime);
        assert_eq!(layer_key(&inputs).unwrap(), key);

        let kinds = layers.join("kinds.toml");
        let text = fs::read_to_string(&kinds).unwrap();
        fs::write(&kinds, format!("{text}\n# changed\n")).unwrap();
        assert_ne!(layer_key(&inputs).unwrap(), key, "a changed kinds.toml kept the key");
        fs::write(&kinds, text).unwrap();

        // A new compile (another compile key) or another root gives a new key.
        let other_build = LayerInputs {
            build_name: "php-8.2.32-x86_64-000000000000",
            ..inputs
        };
        assert_ne!(layer_key(&other_build).unwrap(), key);
        let fpm = LayerInputs {
            kind: "fpm",
            ..other_build
        };
        assert_ne!(layer_key(&fpm).unwrap(), layer_key(&other_build).unwrap());
        // The PHP release files are not inputs of the layer stage: they
        // reach it through the compile key.
        fs::write(layers.join("php/9.9.toml"), "version = \"9.9.0\"\n").unwrap();
        let restored = LayerInputs {
            build_name: "php-8.2.32-x86_64-4f1aa6ab1208",
            kind: "function",
            ..fpm
        };
        assert_eq!(layer_key(&restored).unwrap(), key);
    }
}
