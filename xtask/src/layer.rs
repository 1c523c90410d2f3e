//! Assembling a layer: the list of entries that goes into its zip, with the
//! layout PHP-on-Lambda users rely on (`/opt/bin/php`, `/opt/lib`,
//! `/opt/bref/extensions`, `/opt/bref/etc`, `/opt/bootstrap`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::archive::{Entry, EntrySource};
use crate::build_root::BuildRoot;
use crate::closure::{self, Closure};
use crate::compile::PhpBuild;
use crate::flags::LayerKind;
use crate::matrix::{Definitions, FileSource, Target};

/// Directory of the bundled libraries inside the layer, relative to /opt.
const LIB_DIR: &str = "lib";

/// Directory of the bundled libraries at run time.
const LAYER_LIB_DIR: &str = "/opt/lib";

/// Directory of the shared extensions inside the layer, relative to /opt.
const EXTENSION_DIR: &str = "bref/extensions";

/// A bundled library, as recorded in manifest.json.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BundledLibraryRecord {
    pub soname: String,
    /// File name under /opt/lib holding the library.
    pub file: String,
    /// Whether the target's base image has a library with the same soname,
    /// which the layer's DT_RPATH must win over.
    pub shadows_base_image: bool,
    /// Layer paths of the objects that need it.
    pub needed_by: Vec<String>,
}

/// The contents of one layer.
#[derive(Debug)]
pub struct LayerContents {
    pub entries: Vec<Entry>,
    pub libraries: Vec<BundledLibraryRecord>,
}

/// Lists the entries of the `kind` layer built from `build`.
pub fn assemble(
    definitions: &Definitions,
    kind: LayerKind,
    target: &Target,
    build: &PhpBuild,
    root: &BuildRoot,
    project_root: &Path,
) -> Result<LayerContents> {
    let mut entries = Vec::new();
    let mut roots: Vec<(PathBuf, String)> = Vec::new();

    for binary in &definitions.kind(kind).binaries {
        let source = build.prefix().join(binary);
        let name = Path::new(binary).file_name().context("binary path has no file name")?;
        let path = format!("bin/{}", name.to_string_lossy());
        roots.push((source.clone(), path.clone()));
        entries.push(file_entry(path, source, 0o755));
    }

    let extension_dir = build.extension_dir()?;
    for extension in definitions.extensions.shared() {
        let file = extension.file.as_deref().expect("shared extensions name their file");
        let source = extension_dir.join(file);
        let path = format!("{EXTENSION_DIR}/{file}");
        roots.push((source.clone(), path.clone()));
        entries.push(file_entry(path, source, 0o644));
    }

    for (source, path) in &roots {
        check_rpath(source).with_context(|| format!("{path} of the {kind} layer ({})", source.display()))?;
    }
    let root_paths: Vec<PathBuf> = roots.iter().map(|(source, _)| source.clone()).collect();
    let closure = closure::resolve_closure(&root.path, &root_paths, &target.policy())
        .with_context(|| format!("the shared-library closure of the {kind} layer is incomplete"))?;
    let libraries = library_records(&closure, &roots, target)?;
    entries.extend(library_entries(&closure)?);

    for file in definitions.files.iter().filter(|file| file.belongs_to(kind)) {
        let source = match &file.source {
            FileSource::Runtime(path) => project_root.join("runtime").join(path),
            FileSource::BuildRoot(path) => root.path.join(path.strip_prefix("/").unwrap_or(path)),
        };
        if !source.is_file() {
            bail!(
                "layer file {} comes from {}, which does not exist",
                file.to,
                source.display()
            );
        }
        entries.push(file_entry(file.to.clone(), source, file.mode));
    }

    entries.extend(directory_entries(&entries));
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(LayerContents { entries, libraries })
}

/// Fails unless the ELF file at `path` has exactly the DT_RPATH
/// `/opt/lib`. Lambda searches /opt/lib last, after the base image's
/// /lib64, so only an RPATH makes the bundled libraries win.
fn check_rpath(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    let elf = goblin::elf::Elf::parse(&bytes).with_context(|| format!("invalid ELF file {}", path.display()))?;
    verify_rpath(&elf.rpaths)
}

fn verify_rpath(rpaths: &[&str]) -> Result<()> {
    let entries: Vec<&str> = rpaths.iter().flat_map(|rpath| rpath.split(':')).collect();
    if entries != [LAYER_LIB_DIR] {
        bail!(
            "DT_RPATH is {entries:?}, expected [\"{LAYER_LIB_DIR}\"]; link with \
             -Wl,--disable-new-dtags -Wl,-rpath,{LAYER_LIB_DIR} (ldflags in layers/configure.toml) and configure with --disable-rpath"
        );
    }
    Ok(())
}

fn file_entry(path: String, source: PathBuf, mode: u32) -> Entry {
    Entry {
        path,
        source: EntrySource::File(source),
        mode,
    }
}

/// Returns one file per library under its real name, plus a symlink from
/// the soname when the names differ, as the build root has them.
fn library_entries(closure: &Closure) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut names = BTreeSet::new();
    for library in &closure.libraries {
        let real_name = file_name(&library.real_path)?;
        if names.insert(real_name.clone()) {
            entries.push(file_entry(
                format!("{LIB_DIR}/{real_name}"),
                library.real_path.clone(),
                0o644,
            ));
        }
        if library.soname != real_name && names.insert(library.soname.clone()) {
            entries.push(Entry {
                path: format!("{LIB_DIR}/{}", library.soname),
                source: EntrySource::Symlink(real_name),
                mode: 0o777,
            });
        }
    }
    Ok(entries)
}

fn library_records(
    closure: &Closure,
    roots: &[(PathBuf, String)],
    target: &Target,
) -> Result<Vec<BundledLibraryRecord>> {
    let layer_path = |host: &Path| -> String {
        if let Some((_, path)) = roots.iter().find(|(source, _)| source == host) {
            return path.clone();
        }
        let library = closure
            .libraries
            .iter()
            .find(|library| library.path == host || library.real_path == host);
        match library {
            Some(library) => format!("{LIB_DIR}/{}", library.soname),
            None => host.display().to_string(),
        }
    };
    let mut records = Vec::new();
    for library in &closure.libraries {
        let mut needed_by: Vec<String> = library.needed_by.iter().map(|path| layer_path(path)).collect();
        needed_by.sort();
        needed_by.dedup();
        records.push(BundledLibraryRecord {
            soname: library.soname.clone(),
            file: file_name(&library.real_path)?,
            shadows_base_image: target.base_libs.contains(&library.soname),
            needed_by,
        });
    }
    Ok(records)
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name", path.display()))
}

/// Returns an entry for every directory that contains an entry.
fn directory_entries(entries: &[Entry]) -> Vec<Entry> {
    let mut directories = BTreeSet::new();
    for entry in entries {
        let mut path = entry.path.as_str();
        while let Some((parent, _)) = path.rsplit_once('/') {
            directories.insert(parent.to_string());
            path = parent;
        }
    }
    directories
        .into_iter()
        .map(|path| Entry {
            path,
            source: EntrySource::Directory,
            mode: 0o755,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpath_must_be_layer_lib_dir() {
        assert!(verify_rpath(&["/opt/lib"]).is_ok());

        let missing = verify_rpath(&[]).unwrap_err().to_string();
        assert!(missing.contains("--disable-new-dtags"), "{missing}");
        let extra = verify_rpath(&["/opt/lib:/usr/lib/x86_64-linux-gnu"])
            .unwrap_err()
            .to_string();
        assert!(extra.contains("/usr/lib/x86_64-linux-gnu"), "{extra}");
    }

    #[test]
    fn directories_cover_every_parent() {
        let entries = vec![
            file_entry("bref/etc/php/conf.d/10-layer.ini".into(), PathBuf::from("/x"), 0o644),
            file_entry("bin/php".into(), PathBuf::from("/y"), 0o755),
        ];
        let paths: Vec<String> = directory_entries(&entries)
            .into_iter()
            .map(|entry| entry.path)
            .collect();
        assert_eq!(
            paths,
            ["bin", "bref", "bref/etc", "bref/etc/php", "bref/etc/php/conf.d"]
        );
    }
}
