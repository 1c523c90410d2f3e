//! The build matrix, read from the data files under `layers/`: PHP
//! releases, the extension set, configure flags, the build root, the layer
//! kinds and the target platforms.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use crate::closure::{ElfMachine, GlibcVersion, TargetPolicy};
use crate::flags::{Arch, LayerKind, PhpMinor};

/// Everything declared under `layers/`.
#[derive(Debug)]
pub struct Definitions {
    pub php: BTreeMap<PhpMinor, PhpRelease>,
    pub extensions: ExtensionSet,
    pub configure: ConfigureFlags,
    pub build_root: BuildRootSpec,
    pub kinds: Vec<KindSpec>,
    pub files: Vec<FileSpec>,
    pub targets: BTreeMap<Arch, Target>,
}

/// One PHP release: `layers/php/<major.minor>.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhpRelease {
    #[serde(skip, default = "placeholder_minor")]
    pub minor: PhpMinor,
    /// Full version, such as 8.2.32.
    pub version: String,
    /// Lowercase hex sha256 of the source tarball.
    pub sha256: String,
    /// Download URLs of the tarball, tried in order.
    #[serde(default)]
    pub urls: Vec<String>,
    pub debian_source: Option<DebianSource>,
    /// Whether `build-layers` without `--php` builds this release.
    #[serde(default = "yes")]
    pub build_by_default: bool,
    /// Differences from configure.toml for this release.
    #[serde(default)]
    pub configure: ReleaseConfigure,
}

/// configure switches a release adds to or removes from the common ones.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseConfigure {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

fn yes() -> bool {
    true
}

fn placeholder_minor() -> PhpMinor {
    PhpMinor { major: 0, minor: 0 }
}

impl PhpRelease {
    /// File name of the verified tarball in the source cache.
    pub fn tarball_name(&self) -> String {
        format!("php-{}.tar.xz", self.version)
    }
}

/// A Debian source package whose `.orig` tarball is the PHP release.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebianSource {
    pub package: String,
    pub version: String,
    pub suites: Vec<String>,
    /// File name of the upstream tarball in the source package.
    pub file: String,
}

/// Build and load mode of an extension.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ExtensionMode {
    /// Compiled into the php binary.
    Builtin,
    /// An .so loaded by the layer's ini files.
    Shared,
    /// An .so that users enable with an ini file of their own.
    SharedOff,
}

/// One entry of `layers/extensions.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    /// The module name that `php -m` prints.
    pub name: String,
    /// The configure switch that builds it.
    pub configure: String,
    #[serde(default = "builtin")]
    pub mode: ExtensionMode,
    /// File name of a shared extension (`intl.so`).
    pub file: Option<String>,
    /// Whether PHP loads it with zend_extension rather than extension.
    #[serde(default)]
    pub zend: bool,
}

fn builtin() -> ExtensionMode {
    ExtensionMode::Builtin
}

/// `layers/extensions.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionSet {
    /// Extensions compiled into every PHP, without a configure switch.
    pub always: Vec<String>,
    #[serde(rename = "extension")]
    pub extensions: Vec<Extension>,
}

/// The modules `php -m` prints, split in its two sections.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModuleList {
    pub php_modules: BTreeSet<String>,
    pub zend_modules: BTreeSet<String>,
}

impl ExtensionSet {
    /// Returns the modules `php -m` lists with the layer's ini files, plus
    /// the `shared-off` extensions named in `enabled`.
    pub fn expected_modules(&self, enabled: &[&str]) -> ModuleList {
        let mut php_modules: BTreeSet<String> = self.always.iter().cloned().collect();
        let mut zend_modules = BTreeSet::new();
        for extension in &self.extensions {
            let loaded = match extension.mode {
                ExtensionMode::Builtin | ExtensionMode::Shared => true,
                ExtensionMode::SharedOff => enabled.contains(&extension.name.as_str()),
            };
            if !loaded {
                continue;
            }
            php_modules.insert(extension.name.clone());
            if extension.zend {
                zend_modules.insert(extension.name.clone());
            }
        }
        ModuleList {
            php_modules,
            zend_modules,
        }
    }

    /// Shared extensions, in declaration order.
    pub fn shared(&self) -> impl Iterator<Item = &Extension> {
        self.extensions
            .iter()
            .filter(|extension| extension.mode != ExtensionMode::Builtin)
    }
}

/// `layers/configure.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigureFlags {
    pub flags: Vec<String>,
    pub cflags: String,
    pub ldflags: String,
}

/// `layers/build-root.toml`.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRootSpec {
    /// Debian suite (release code name).
    pub suite: String,
    /// Packages of the build machine's architecture.
    pub tools: Vec<String>,
    /// Packages of the target's architecture.
    pub libraries: Vec<String>,
}

/// One `[[kind]]` of `layers/kinds.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSpec {
    pub name: LayerKind,
    /// Layer name template; `{php}` is the version without its dot.
    pub layer: String,
    /// Template of the layer description; `{version}` is the full version.
    pub description: String,
    /// Paths under the PHP install prefix copied to /opt/bin.
    pub binaries: Vec<String>,
}

/// Source of a layer file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    /// A path under `runtime/`.
    Runtime(PathBuf),
    /// An absolute path inside the build root.
    BuildRoot(PathBuf),
}

/// One `[[file]]` of `layers/kinds.toml`.
#[derive(Debug)]
pub struct FileSpec {
    pub source: FileSource,
    /// Path inside the layer, relative to /opt.
    pub to: String,
    pub mode: u32,
    /// Kinds that contain the file; `None` means every kind.
    pub kinds: Option<Vec<LayerKind>>,
}

impl FileSpec {
    pub fn belongs_to(&self, kind: LayerKind) -> bool {
        self.kinds.as_ref().is_none_or(|kinds| kinds.contains(&kind))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSpec {
    runtime: Option<PathBuf>,
    build_root: Option<PathBuf>,
    to: String,
    mode: u32,
    kinds: Option<Vec<LayerKind>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKinds {
    kind: Vec<KindSpec>,
    file: Vec<RawFileSpec>,
}

/// A target platform: `layers/targets/al2023-<arch>.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(skip, default = "placeholder_arch")]
    pub arch: Arch,
    pub lambda_architecture: String,
    /// Prefix of the layer names for this architecture (`arm-`).
    pub layer_prefix: String,
    /// GNU triplet of the target (`aarch64-linux-gnu`), the prefix of its
    /// cross tools.
    pub gnu_triplet: String,
    /// Path of the dynamic loader, the executables' PT_INTERP.
    pub loader: String,
    #[serde(deserialize_with = "deserialize_from_str")]
    pub glibc_max: GlibcVersion,
    pub glibc_sonames: BTreeSet<String>,
    pub search_dirs: Vec<PathBuf>,
    pub ld_library_path: String,
    /// File name of the base image listing, beside the target file.
    #[serde(rename = "base_libs")]
    base_libs_file: String,
    /// File names in /lib64 of the base image.
    #[serde(skip)]
    pub base_libs: BTreeSet<String>,
    /// How to cross-compile for this target from another architecture.
    pub cross: Option<CrossSpec>,
}

/// The `[cross]` section of a target: what cross-compiling for it needs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossSpec {
    /// Packages of the build machine that compile for the target.
    pub packages: Vec<String>,
    /// Autoconf cache variables passed to configure (`ac_cv_pread=yes`).
    pub configure_cache: BTreeMap<String, String>,
    /// Macros set in main/php_config.h after configure.
    pub php_config_h: BTreeMap<String, String>,
    /// Macros that may differ from the native build's php_config.h.
    pub architecture_specific_macros: MacroNames,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MacroNames {
    pub names: BTreeSet<String>,
}

fn deserialize_from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn placeholder_arch() -> Arch {
    Arch::X86_64
}

impl Target {
    /// Returns the policy the closure checks objects against.
    pub fn policy(&self) -> TargetPolicy {
        TargetPolicy {
            machine: match self.arch {
                Arch::X86_64 => ElfMachine::X86_64,
                Arch::Arm64 => ElfMachine::Aarch64,
            },
            glibc_max: self.glibc_max,
            system_sonames: self.system_sonames(),
            search_dirs: self.search_dirs.clone(),
        }
    }

    /// Returns the sonames the platform provides: glibc's and the loader's.
    pub fn system_sonames(&self) -> BTreeSet<String> {
        let mut sonames = self.glibc_sonames.clone();
        let loader = self.loader.rsplit('/').next().unwrap_or(&self.loader);
        sonames.insert(loader.to_string());
        sonames
    }

    /// Returns whether building for this target on a machine of `host`
    /// architecture means cross-compiling.
    pub fn is_cross(&self, host: Arch) -> bool {
        self.arch != host
    }

    /// Returns the layer name of `kind` for `php` on this target (`arm-php-82-fpm`).
    pub fn layer_name(&self, kind: &KindSpec, php: PhpMinor) -> String {
        let name = kind.layer.replace("{php}", &php.short());
        format!("{}{}", self.layer_prefix, name)
    }
}

impl Definitions {
    /// Reads and checks every file under `layers_dir`.
    pub fn load(layers_dir: &Path) -> Result<Definitions> {
        let php = load_php_releases(&layers_dir.join("php"))?;
        let extensions: ExtensionSet = read_toml(&layers_dir.join("extensions.toml"))?;
        let configure: ConfigureFlags = read_toml(&layers_dir.join("configure.toml"))?;
        let build_root: BuildRootSpec = read_toml(&layers_dir.join("build-root.toml"))?;
        let (kinds, files) = load_kinds(&layers_dir.join("kinds.toml"))?;
        let targets = load_targets(&layers_dir.join("targets"))?;

        let definitions = Definitions {
            php,
            extensions,
            configure,
            build_root,
            kinds,
            files,
            targets,
        };
        definitions
            .check()
            .with_context(|| format!("invalid layer definitions in {}", layers_dir.display()))?;
        Ok(definitions)
    }

    /// Returns the releases `build-layers` builds without `--php`.
    pub fn default_releases(&self) -> Vec<PhpMinor> {
        self.php
            .values()
            .filter(|release| release.build_by_default)
            .map(|release| release.minor)
            .collect()
    }

    /// Returns the kind's entry from kinds.toml.
    pub fn kind(&self, kind: LayerKind) -> &KindSpec {
        self.kinds
            .iter()
            .find(|spec| spec.name == kind)
            .expect("check() ensures every kind is declared")
    }

    /// Returns the paths under `runtime/` of the files that layers of
    /// `kind` ship, in the order of kinds.toml.
    pub fn runtime_files(&self, kind: LayerKind) -> Vec<&Path> {
        self.files
            .iter()
            .filter(|file| file.belongs_to(kind))
            .filter_map(|file| match &file.source {
                FileSource::Runtime(path) => Some(path.as_path()),
                FileSource::BuildRoot(_) => None,
            })
            .collect()
    }

    /// Returns the target of `arch`.
    pub fn target(&self, arch: Arch) -> &Target {
        &self.targets[&arch]
    }

    fn check(&self) -> Result<()> {
        for kind in LayerKind::ALL {
            let count = self.kinds.iter().filter(|spec| spec.name == *kind).count();
            ensure!(
                count == 1,
                "kinds.toml must declare the kind {kind} exactly once, found {count}"
            );
        }

        let mut names = BTreeSet::new();
        for extension in &self.extensions.extensions {
            ensure!(
                names.insert(extension.name.as_str()),
                "extensions.toml declares {:?} twice",
                extension.name
            );
            let needs_file = extension.mode != ExtensionMode::Builtin;
            ensure!(
                needs_file == extension.file.is_some(),
                "extension {:?}: `file` must be set for shared extensions and only for them",
                extension.name
            );
        }

        for release in self.php.values() {
            for switch in &release.configure.remove {
                let known = self.configure.flags.contains(switch)
                    || self
                        .extensions
                        .extensions
                        .iter()
                        .any(|extension| &extension.configure == switch);
                ensure!(
                    known,
                    "php/{}.toml removes the configure switch {switch:?}, which neither configure.toml nor \
                     extensions.toml sets",
                    release.minor
                );
            }
        }

        for target in self.targets.values() {
            let missing: Vec<&String> = target
                .glibc_sonames
                .iter()
                .filter(|soname| !target.base_libs.contains(*soname))
                .collect();
            ensure!(
                missing.is_empty(),
                "target {}: glibc_sonames lists {missing:?}, which the base image listing {} does not contain; \
                 a library the platform lacks must be bundled, so remove it from glibc_sonames",
                target.arch,
                target.base_libs_file
            );
        }
        Ok(())
    }
}

fn load_php_releases(dir: &Path) -> Result<BTreeMap<PhpMinor, PhpRelease>> {
    let mut releases = BTreeMap::new();
    for path in toml_files(dir)? {
        let stem = file_stem(&path)?;
        let minor: PhpMinor = stem
            .parse()
            .map_err(|error: String| anyhow::anyhow!("{}: {error}", path.display()))?;
        let mut release: PhpRelease = read_toml(&path)?;
        release.minor = minor;
        check_release(&release).with_context(|| format!("invalid {}", path.display()))?;
        releases.insert(minor, release);
    }
    ensure!(!releases.is_empty(), "no PHP release declared in {}", dir.display());
    Ok(releases)
}

fn check_release(release: &PhpRelease) -> Result<()> {
    let prefix = format!("{}.", release.minor);
    ensure!(
        release.version.starts_with(&prefix),
        "version {} does not belong to the {} series named by the file",
        release.version,
        release.minor
    );
    let is_hex = release.sha256.len() == 64
        && release
            .sha256
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
    ensure!(
        is_hex,
        "sha256 {:?} is not 64 lowercase hexadecimal digits",
        release.sha256
    );
    Ok(())
}

fn load_kinds(path: &Path) -> Result<(Vec<KindSpec>, Vec<FileSpec>)> {
    let raw: RawKinds = read_toml(path)?;
    let mut files = Vec::new();
    for file in raw.file {
        let source = match (file.runtime, file.build_root) {
            (Some(runtime), None) => FileSource::Runtime(runtime),
            (None, Some(build_root)) if build_root.is_absolute() => FileSource::BuildRoot(build_root),
            (None, Some(build_root)) => bail!(
                "{}: build_root {} must be an absolute path",
                path.display(),
                build_root.display()
            ),
            _ => bail!(
                "{}: the file for {} must set exactly one of `runtime` and `build_root`",
                path.display(),
                file.to
            ),
        };
        ensure!(
            !file.to.starts_with('/') && !file.to.split('/').any(|part| part == ".." || part.is_empty()),
            "{}: `to = {:?}` must be a relative path inside /opt",
            path.display(),
            file.to
        );
        files.push(FileSpec {
            source,
            to: file.to,
            mode: file.mode,
            kinds: file.kinds,
        });
    }
    Ok((raw.kind, files))
}

fn load_targets(dir: &Path) -> Result<BTreeMap<Arch, Target>> {
    let mut targets = BTreeMap::new();
    for arch in Arch::ALL {
        let path = dir.join(format!("al2023-{}.toml", arch.lambda_name()));
        if !path.exists() {
            continue;
        }
        let mut target: Target = read_toml(&path)?;
        target.arch = *arch;
        let listing = dir.join(&target.base_libs_file);
        let text = fs::read_to_string(&listing)
            .with_context(|| format!("failed to read the base image listing {}", listing.display()))?;
        target.base_libs = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(String::from)
            .collect();
        targets.insert(*arch, target);
    }
    Ok(targets)
}

fn toml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|extension| extension == "toml") {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

fn file_stem(path: &Path) -> Result<&str> {
    path.file_stem()
        .and_then(|stem| stem.to_str())
        .with_context(|| format!("invalid file name {}", path.display()))
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid TOML in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definitions() -> Definitions {
        Definitions::load(&crate::project_root().join("layers")).unwrap()
    }

    #[test]
    fn layers_directory_loads() {
        let definitions = definitions();
        let php82 = &definitions.php[&"8.2".parse().unwrap()];
        assert_eq!(php82.version, "8.2.32");
        assert!(definitions.targets.contains_key(&Arch::X86_64));
    }

    #[test]
    fn release_configure_differences_apply() {
        let mut definitions = definitions();
        let php = "8.4".parse().unwrap();
        let targets = self::definitions().targets;
        let toolchain = crate::compile::Toolchain {
            target: &targets[&Arch::X86_64],
            cross: None,
        };
        let common = crate::compile::configure_args(&definitions, &definitions.php[&php], &toolchain);
        assert!(common.contains(&"--enable-fpm".to_string()));

        let release = definitions.php.get_mut(&php).unwrap();
        release.configure.remove.push("--enable-fpm".to_string());
        release.configure.add.push("--enable-embed".to_string());
        let changed = crate::compile::configure_args(&definitions, &definitions.php[&php], &toolchain);
        assert!(!changed.contains(&"--enable-fpm".to_string()), "{changed:?}");
        assert_eq!(changed.last().map(String::as_str), Some("--enable-embed"));
        definitions.check().unwrap();

        definitions
            .php
            .get_mut(&php)
            .unwrap()
            .configure
            .remove
            .push("--with-nothing".to_string());
        let error = definitions.check().unwrap_err().to_string();
        assert!(error.contains("--with-nothing"), "{error}");
    }

    #[test]
    fn expected_modules_follow_modes() {
        let extensions = definitions().extensions;

        let default = extensions.expected_modules(&[]);
        assert!(default.php_modules.contains("curl"));
        assert!(default.php_modules.contains("Zend OPcache"));
        assert!(default.php_modules.contains("Core"));
        assert!(!default.php_modules.contains("intl"));
        assert_eq!(default.zend_modules, BTreeSet::from(["Zend OPcache".to_string()]));

        let enabled = extensions.expected_modules(&["intl", "pdo_pgsql"]);
        assert!(enabled.php_modules.contains("intl"));
        assert!(enabled.php_modules.contains("pdo_pgsql"));
    }

    #[test]
    fn layer_names_follow_field_convention() {
        let definitions = definitions();
        let php = "8.2".parse().unwrap();
        let target = definitions.target(Arch::X86_64);
        assert_eq!(target.layer_name(definitions.kind(LayerKind::Function), php), "php-82");
        assert_eq!(target.layer_name(definitions.kind(LayerKind::Fpm), php), "php-82-fpm");
    }

    #[test]
    fn release_with_bad_checksum_is_rejected() {
        let release = PhpRelease {
            minor: "8.2".parse().unwrap(),
            version: "8.2.32".into(),
            sha256: "E02AA173".into(),
            urls: vec![],
            debian_source: None,
            build_by_default: true,
            configure: Default::default(),
        };
        let error = check_release(&release).unwrap_err().to_string();
        assert!(error.contains("64 lowercase hexadecimal"), "{error}");
    }

    #[test]
    fn release_of_other_series_is_rejected() {
        let release = PhpRelease {
            minor: "8.3".parse().unwrap(),
            version: "8.2.32".into(),
            sha256: "e".repeat(64),
            urls: vec![],
            debian_source: None,
            build_by_default: true,
            configure: Default::default(),
        };
        let error = check_release(&release).unwrap_err().to_string();
        assert!(error.contains("8.3 series"), "{error}");
    }

    #[test]
    fn glibc_sonames_exist_in_base_image() {
        let mut definitions = definitions();
        definitions
            .targets
            .get_mut(&Arch::X86_64)
            .unwrap()
            .glibc_sonames
            .insert("libnsl.so.1".into());
        let error = definitions.check().unwrap_err().to_string();
        assert!(error.contains("libnsl.so.1"), "{error}");
    }
}
