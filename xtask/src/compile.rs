//! Compiling PHP inside the build root and installing it into a staging tree.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::build_root::BuildRoot;
use crate::host;
use crate::matrix::{CrossSpec, Definitions, PhpRelease, Target};
use crate::php_config;
use crate::process;
use crate::stage::READY_MARKER;

/// PHP's install prefix, as configure.toml sets it.
pub const PREFIX: &str = "/opt/bref";

/// Version of the compile steps in this file: changing it invalidates
/// every cached build. Raise it when a change alters the compiled files.
const RECIPE_VERSION: &str = "2";

/// Directory of the builds inside the build root. Builds live inside the
/// root so that the closure resolves their binaries as the root's own files.
const BUILDS_DIR_INSIDE: &str = "build";

/// A compiled PHP, installed in a staging tree on the host.
#[derive(Debug, Clone)]
pub struct PhpBuild {
    /// The build's cache directory.
    pub dir: PathBuf,
}

impl PhpBuild {
    /// Returns the install prefix inside the staging tree (`<dir>/stage/opt/bref`).
    pub fn prefix(&self) -> PathBuf {
        self.dir.join("stage").join(PREFIX.trim_start_matches('/'))
    }

    /// Returns the directory that contains the shared extensions.
    pub fn extension_dir(&self) -> Result<PathBuf> {
        let parent = self.prefix().join("lib/php/extensions");
        let mut dirs: Vec<PathBuf> = fs::read_dir(&parent)
            .with_context(|| format!("failed to list {}", parent.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.is_dir())
            .collect();
        match dirs.len() {
            1 => Ok(dirs.remove(0)),
            count => bail!(
                "expected one extension directory in {}, found {count}",
                parent.display()
            ),
        }
    }

    /// Returns the path of the `main/php_config.h` that configure generated.
    pub fn php_config_h(&self) -> PathBuf {
        self.dir.join("php_config.h")
    }
}

/// Compiler setup for a target: native, or cross with its corrections.
pub struct Toolchain<'a> {
    pub target: &'a Target,
    /// Set when cross-compiling.
    pub cross: Option<Cross<'a>>,
}

/// Inputs of a cross compile besides the target.
pub struct Cross<'a> {
    pub spec: &'a CrossSpec,
    /// GNU triplet of the build machine, for configure's --build.
    pub build_triplet: &'a str,
    /// The php_config.h of the native build of the same source, which the
    /// cross build's header must match.
    pub native_header: PathBuf,
}

/// Settings of [`compile`]: the cache, the jobs, and whether to force.
#[derive(Clone, Copy)]
pub struct CompileOptions<'a> {
    /// The cache, for the compile's log.
    pub cache_dir: &'a Path,
    /// Parallel jobs for `make`.
    pub jobs: usize,
    /// Compile even when a finished build with the same inputs exists.
    pub force: bool,
}

/// Returns the build of `release` for the root's architecture, compiling it
/// when the cache contains no finished build with the same inputs.
pub fn compile(
    definitions: &Definitions,
    release: &PhpRelease,
    tarball: &Path,
    root: &BuildRoot,
    toolchain: &Toolchain,
    options: &CompileOptions,
) -> Result<PhpBuild> {
    let CompileOptions { cache_dir, jobs, force } = *options;
    let configure_args = configure_args(definitions, release, toolchain);
    let key = build_key(release, root, &configure_args, definitions, toolchain);
    let name = format!("php-{}-{}-{key}", release.version, root.arch);
    let dir = root.path.join(BUILDS_DIR_INSIDE).join(&name);
    let build = PhpBuild { dir: dir.clone() };
    if dir.join(READY_MARKER).exists() && !force {
        eprintln!("compile php-{} ({}): cached", release.version, root.arch);
        return Ok(build);
    }

    let log = cache_dir.join("logs").join(format!("compile-{name}.log"));
    compile_into(definitions, release, tarball, root, toolchain, &dir, &log, jobs)?;
    Ok(build)
}

/// Wall times of the steps of one compile.
#[derive(Debug, Clone, Copy)]
pub struct CompileTimings {
    pub configure: Duration,
    pub make: Duration,
}

/// Compiles `release` into the build directory `dir` inside the root,
/// through `dir.partial`, replacing whatever `dir` held.
#[allow(clippy::too_many_arguments)]
pub fn compile_into(
    definitions: &Definitions,
    release: &PhpRelease,
    tarball: &Path,
    root: &BuildRoot,
    toolchain: &Toolchain,
    dir: &Path,
    log: &Path,
    jobs: usize,
) -> Result<CompileTimings> {
    host::ensure(&[host::XZ])?;
    let partial = crate::process::partial_path(dir);
    for stale in [&partial, dir] {
        if stale.exists() {
            fs::remove_dir_all(stale).with_context(|| format!("failed to remove {}", stale.display()))?;
        }
    }
    fs::create_dir_all(&partial)?;
    if log.exists() {
        fs::remove_file(log)?;
    }
    let label = format!("compile php-{} ({})", release.version, root.arch);
    eprintln!("{label}: started, log in {}", log.display());
    let started = Instant::now();

    let mut extract = Command::new("tar");
    extract.arg("-xf").arg(tarball).arg("-C").arg(&partial);
    process::run_logged(extract, log)?;
    let source_name = format!("php-{}", release.version);
    let source_dir = partial.join(&source_name);
    if !source_dir.is_dir() {
        bail!("{} does not contain the directory {source_name}/", tarball.display());
    }
    let source_date_epoch = newest_mtime(&source_dir)?.to_string();
    let work_inside = inside_path(root, &partial);
    let source_inside = format!("{work_inside}/{source_name}");
    // Paths of the source tree in the binaries (__FILE__, debug info) do
    // not depend on where the build ran, so rebuilds give the same bytes.
    let cflags = format!(
        "{} -ffile-prefix-map={source_inside}=/usr/src/{source_name}",
        definitions.configure.cflags
    );

    let in_root = |program: &str| {
        let mut command = root
            .command(program)
            .cwd(&source_inside)
            .env("SOURCE_DATE_EPOCH", source_date_epoch.as_str())
            .env("CFLAGS", cflags.as_str())
            .env("CXXFLAGS", cflags.as_str())
            .env("LDFLAGS", definitions.configure.ldflags.as_str())
            // configure records `uname -a` in the binary; keep the host's
            // name and kernel out of it.
            .env("PHP_UNAME", "Linux");
        if toolchain.cross.is_some() {
            let triplet = &toolchain.target.gnu_triplet;
            command = command
                .env("CC", format!("{triplet}-gcc"))
                .env("CXX", format!("{triplet}-g++"))
                .env("PKG_CONFIG", format!("{triplet}-pkg-config"));
        }
        command
    };

    let configure_args = configure_args(definitions, release, toolchain);
    let configure_started = Instant::now();
    let configure = in_root("./configure").args(configure_args.iter().map(String::as_str));
    configure.run_logged(log)?;
    if let Some(cross) = &toolchain.cross {
        correct_and_check_header(&source_dir.join("main/php_config.h"), cross)?;
    }
    let configure_time = configure_started.elapsed();
    eprintln!("{label}: configured, running make");

    let make_started = Instant::now();
    let make = in_root("make").arg(format!("-j{jobs}"));
    make.run_logged(log)?;
    let make_time = make_started.elapsed();
    let install = in_root("make")
        .arg("install")
        .arg(format!("INSTALL_ROOT={work_inside}/stage"));
    install.run_logged(log)?;

    let staged = PhpBuild { dir: partial.clone() };
    strip(definitions, &staged, root, toolchain, log)?;
    fs::copy(source_dir.join("main/php_config.h"), staged.php_config_h())?;
    fs::remove_dir_all(&source_dir).with_context(|| format!("failed to remove {}", source_dir.display()))?;

    fs::write(partial.join(READY_MARKER), configure_args.join("\n"))?;
    fs::rename(&partial, dir).with_context(|| format!("failed to move {} to {}", partial.display(), dir.display()))?;
    eprintln!("{label}: finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(CompileTimings {
        configure: configure_time,
        make: make_time,
    })
}

/// Sets the macros a cross configure cannot find out, then fails unless
/// the header matches the native build's, apart from the macros reviewed
/// as architecture-specific.
fn correct_and_check_header(header_path: &Path, cross: &Cross) -> Result<()> {
    let header =
        fs::read_to_string(header_path).with_context(|| format!("failed to read {}", header_path.display()))?;
    let corrected = php_config::apply_corrections(&header, &cross.spec.php_config_h)?;
    fs::write(header_path, &corrected)?;

    let native = fs::read_to_string(&cross.native_header)
        .with_context(|| format!("failed to read the native build's {}", cross.native_header.display()))?;
    let differences = php_config::compare(
        &php_config::parse(&native),
        &php_config::parse(&corrected),
        &cross.spec.architecture_specific_macros.names,
    );
    if !differences.is_empty() {
        let lines: Vec<String> = differences.iter().map(|difference| format!("  {difference}")).collect();
        bail!(
            "the cross configure's php_config.h differs from the native one ({}):\n{}\n\
             give configure the answer as a cache variable ([cross.configure_cache]), correct the macro \
             ([cross.php_config_h]) or, if it really depends on the CPU, add it to \
             [cross.architecture_specific_macros] in the target file",
            cross.native_header.display(),
            lines.join("\n")
        );
    }
    Ok(())
}

/// Returns the configure arguments: the common flags, one switch per
/// extension, and for a cross build the triplets and cache variables.
pub fn configure_args(definitions: &Definitions, release: &PhpRelease, toolchain: &Toolchain) -> Vec<String> {
    let mut args: Vec<String> = definitions.configure.flags.clone();
    args.extend(
        definitions
            .extensions
            .extensions
            .iter()
            .map(|extension| extension.configure.clone()),
    );
    args.retain(|arg| !release.configure.remove.contains(arg));
    args.extend(release.configure.add.iter().cloned());
    if let Some(cross) = &toolchain.cross {
        args.push(format!("--host={}", toolchain.target.gnu_triplet));
        args.push(format!("--build={}", cross.build_triplet));
        args.extend(
            cross
                .spec
                .configure_cache
                .iter()
                .map(|(name, value)| format!("{name}={value}")),
        );
    }
    args
}

/// Strips the binaries and shared extensions with the build root's strip.
fn strip(
    definitions: &Definitions,
    build: &PhpBuild,
    root: &BuildRoot,
    toolchain: &Toolchain,
    log: &Path,
) -> Result<()> {
    let mut binaries: Vec<String> = Vec::new();
    for kind in &definitions.kinds {
        binaries.extend(kind.binaries.iter().cloned());
    }
    binaries.sort();
    binaries.dedup();

    let stage_prefix = format!("{}/stage{PREFIX}", inside_path(root, &build.dir));
    let mut paths: Vec<String> = binaries
        .iter()
        .map(|binary| format!("{stage_prefix}/{binary}"))
        .collect();
    let extension_dir = build.extension_dir()?;
    for extension in definitions.extensions.shared() {
        let file = extension
            .file
            .as_deref()
            .expect("check() requires a file for shared extensions");
        if !extension_dir.join(file).exists() {
            bail!(
                "make install did not produce the extension {file} in {}; check its configure switch {:?}",
                extension_dir.display(),
                extension.configure
            );
        }
        paths.push(format!("{}/{file}", inside_path(root, &extension_dir)));
    }

    let program = match toolchain.cross {
        Some(_) => format!("{}-strip", toolchain.target.gnu_triplet),
        None => "strip".to_string(),
    };
    let command = root
        .command(&program)
        .arg("--strip-unneeded")
        .args(paths.iter().map(String::as_str));
    command.run_logged(log)
}

/// Returns the path of the host path `path`, which lies in the build root,
/// as commands inside the root see it.
fn inside_path(root: &BuildRoot, path: &Path) -> String {
    let relative = path
        .strip_prefix(&root.path)
        .expect("the path lies inside the build root");
    format!("/{}", relative.display())
}

/// Returns a key that changes whenever an input of the compile changes.
fn build_key(
    release: &PhpRelease,
    root: &BuildRoot,
    configure_args: &[String],
    definitions: &Definitions,
    toolchain: &Toolchain,
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(RECIPE_VERSION.as_bytes());
    if let Some(cross) = &toolchain.cross {
        for (name, value) in &cross.spec.php_config_h {
            hasher.update(format!("{name}={value}\0").as_bytes());
        }
    }
    let root_name = root.path.file_name().unwrap_or_default().to_string_lossy();
    let inputs = [
        release.sha256.as_str(),
        root_name.as_ref(),
        definitions.configure.cflags.as_str(),
        definitions.configure.ldflags.as_str(),
    ];
    for input in inputs.into_iter().chain(configure_args.iter().map(String::as_str)) {
        hasher.update(input.as_bytes());
        hasher.update(b"\0");
    }
    let digest = hasher.finalize();
    crate::sources::hex(&digest[..6])
}

/// Returns the newest modification time under `dir`, in seconds since the
/// epoch: the release's own date, used as SOURCE_DATE_EPOCH.
fn newest_mtime(dir: &Path) -> Result<u64> {
    let mut newest = UNIX_EPOCH;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("failed to list {}", dir.display()))? {
            let entry = entry?;
            let metadata = entry.metadata()?;
            if metadata.is_dir() {
                pending.push(entry.path());
            }
            newest = newest.max(metadata.modified()?);
        }
    }
    let seconds = newest.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if newest > SystemTime::now() {
        bail!("{} has files dated in the future", dir.display());
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::Arch;

    #[test]
    fn build_key_follows_compile_inputs() {
        let layers = crate::project_root().join("layers");
        let mut definitions = Definitions::load(&layers).unwrap();
        let targets = Definitions::load(&layers).unwrap().targets;
        let toolchain = Toolchain {
            target: &targets[&Arch::X86_64],
            cross: None,
        };
        let root = BuildRoot {
            path: PathBuf::from("/cache/roots/bullseye-amd64-cec0119e06d6"),
            arch: Arch::X86_64,
        };
        let php = "8.2".parse().unwrap();
        let key = |definitions: &Definitions, root: &BuildRoot| {
            let release = &definitions.php[&php];
            let args = configure_args(definitions, release, &toolchain);
            build_key(release, root, &args, definitions, &toolchain)
        };
        let base = key(&definitions, &root);
        assert_eq!(key(&definitions, &root), base, "the same inputs gave another key");

        let release = definitions.php.get_mut(&php).unwrap();
        release.configure.add.push("--enable-embed".to_string());
        assert_ne!(key(&definitions, &root), base, "a configure switch kept the key");
        definitions.php.get_mut(&php).unwrap().configure.add.clear();

        definitions.configure.cflags.push_str(" -g");
        assert_ne!(key(&definitions, &root), base, "CFLAGS kept the key");
        definitions.configure.cflags = Definitions::load(&layers).unwrap().configure.cflags;

        definitions.php.get_mut(&php).unwrap().sha256 = "0".repeat(64);
        assert_ne!(key(&definitions, &root), base, "another tarball kept the key");
        definitions.php.get_mut(&php).unwrap().sha256 = Definitions::load(&layers).unwrap().php[&php].sha256.clone();

        let other_root = BuildRoot {
            path: PathBuf::from("/cache/roots/bullseye-amd64-000000000000"),
            arch: Arch::X86_64,
        };
        assert_ne!(key(&definitions, &other_root), base, "another build root kept the key");
        assert_eq!(key(&definitions, &root), base);
    }
}
