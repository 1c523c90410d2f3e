//! The Debian build root: a debootstrapped tree with an old enough glibc,
//! created once per architecture and package set, and the sandbox that runs
//! commands inside it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::flags::Arch;
use crate::host;
use crate::matrix::BuildRootSpec;
use crate::mirror::Mirrors;
use crate::process;

/// File written into a build root once it is complete.
const READY_MARKER: &str = ".php-lambda-layers-ready";

/// A complete build root on the host.
#[derive(Debug, Clone)]
pub struct BuildRoot {
    pub path: PathBuf,
    pub arch: Arch,
}

/// Returns the cached build root for `spec` and `arch`, creating it first
/// when the cache has none.
///
/// The root is assembled in a `.partial` directory and renamed into place
/// only when every package is installed, so an interrupted run never leaves
/// a root that looks complete.
pub fn ensure(spec: &BuildRootSpec, arch: Arch, mirrors: &Mirrors, cache_dir: &Path) -> Result<BuildRoot> {
    let path = root_path(spec, arch, cache_dir);
    let root = BuildRoot {
        path: path.clone(),
        arch,
    };
    if path.join(READY_MARKER).exists() {
        eprintln!("build root {}: cached at {}", spec.suite, path.display());
        return Ok(root);
    }

    host::ensure(&[host::DEBOOTSTRAP, host::BWRAP])?;
    let mirror = mirrors
        .uri_for(&spec.suite)
        .with_context(|| format!("no Debian mirror known for {}; pass --debian-mirror", spec.suite))?;
    let partial = crate::process::partial_path(&path);
    if partial.exists() {
        fs::remove_dir_all(&partial)
            .with_context(|| format!("failed to remove the unfinished root {}", partial.display()))?;
    }
    let log = cache_dir.join("logs").join(format!("build-root-{arch}.log"));
    if log.exists() {
        fs::remove_file(&log)?;
    }

    let started = Instant::now();
    eprintln!(
        "build root {} ({arch}): creating from {mirror}, log in {}",
        spec.suite,
        log.display()
    );
    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .arg("--variant=minbase")
        .arg(format!("--arch={}", arch.debian_name()))
        .arg(&spec.suite)
        .arg(&partial)
        .arg(&mirror);
    process::run_logged(debootstrap, &log)?;

    let partial_root = BuildRoot {
        path: partial.clone(),
        arch,
    };
    let update = partial_root
        .command("apt-get")
        .network(true)
        .args(["update", "--quiet"]);
    process::run_logged(update.build(), &log)?;
    let install = partial_root
        .command("apt-get")
        .network(true)
        .args(["install", "--yes", "--quiet", "--no-install-recommends"])
        .args(spec.packages.iter().map(String::as_str));
    install.run_logged(&log)?;
    partial_root.command("apt-get").arg("clean").run_logged(&log)?;

    fs::write(partial.join(READY_MARKER), serde_json::to_string_pretty(spec)?)?;
    fs::rename(&partial, &path)
        .with_context(|| format!("failed to move {} to {}", partial.display(), path.display()))?;
    eprintln!(
        "build root {} ({arch}): ready in {:.0} s",
        spec.suite,
        started.elapsed().as_secs_f64()
    );
    Ok(root)
}

/// Returns the finished build root for `spec` and `arch`, if the cache has one.
pub fn find(spec: &BuildRootSpec, arch: Arch, cache_dir: &Path) -> Option<BuildRoot> {
    let path = root_path(spec, arch, cache_dir);
    path.join(READY_MARKER).exists().then_some(BuildRoot { path, arch })
}

/// Returns where the root for `spec` lives: a new package list gives a new root.
fn root_path(spec: &BuildRootSpec, arch: Arch, cache_dir: &Path) -> PathBuf {
    let mut hasher = Sha256::new();
    hasher.update(spec.suite.as_bytes());
    for package in &spec.packages {
        hasher.update(b"\0");
        hasher.update(package.as_bytes());
    }
    let digest = hasher.finalize();
    let key: String = digest[..6].iter().map(|byte| format!("{byte:02x}")).collect();
    cache_dir
        .join("roots")
        .join(format!("{}-{}-{key}", spec.suite, arch.debian_name()))
}

impl BuildRoot {
    /// Starts a command that runs `program` inside this root.
    pub fn command(&self, program: &str) -> RootCommand {
        RootCommand {
            root: self.path.clone(),
            program: program.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            network: false,
            cwd: None,
        }
    }
}

/// A command to run inside a build root with bubblewrap: the root as `/`,
/// fresh `/proc`, `/dev` and `/tmp`, a clean environment, no network unless
/// asked for.
#[derive(Debug, Clone)]
pub struct RootCommand {
    root: PathBuf,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    network: bool,
    cwd: Option<String>,
}

impl RootCommand {
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<'a>(mut self, args: impl IntoIterator<Item = &'a str>) -> Self {
        self.args.extend(args.into_iter().map(String::from));
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// Shares the host's network (for apt-get); off by default.
    pub fn network(mut self, enabled: bool) -> Self {
        self.network = enabled;
        self
    }

    /// Sets the working directory inside the root.
    pub fn cwd(mut self, dir: &str) -> Self {
        self.cwd = Some(dir.to_string());
        self
    }

    /// Runs the command with its output in `log`, showing only the part
    /// that runs inside the root.
    pub fn run_logged(self, log: &Path) -> Result<()> {
        let root_name = self.root.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let mut inside = Command::new(&self.program);
        inside.args(&self.args);
        let shown = format!("[{root_name}] {}", process::display(&inside));
        process::run_logged_as(self.build(), &shown, log)
    }

    /// Returns the bwrap command line.
    pub fn build(self) -> Command {
        let mut command = Command::new("bwrap");
        command
            .arg("--bind")
            .arg(&self.root)
            .arg("/")
            .args(["--dev", "/dev", "--proc", "/proc"])
            .args(["--perms", "1777", "--tmpfs", "/tmp"])
            .args(["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "build"])
            .args(["--die-with-parent", "--clearenv"])
            .args([
                "--setenv",
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ])
            .args(["--setenv", "HOME", "/root", "--setenv", "LANG", "C.UTF-8"])
            .args(["--setenv", "DEBIAN_FRONTEND", "noninteractive"]);
        if self.network {
            command.args(["--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"]);
        } else {
            command.arg("--unshare-net");
        }
        for (key, value) in &self.env {
            command.arg("--setenv").arg(key).arg(value);
        }
        if let Some(cwd) = &self.cwd {
            command.args(["--chdir", cwd]);
        }
        command.arg("--").arg(&self.program).args(&self.args);
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(packages: &[&str]) -> BuildRootSpec {
        BuildRootSpec {
            suite: "bullseye".into(),
            packages: packages.iter().map(|name| name.to_string()).collect(),
        }
    }

    #[test]
    fn root_path_changes_with_packages() {
        let cache = Path::new("/cache");
        let one = root_path(&spec(&["gcc"]), Arch::X86_64, cache);
        let two = root_path(&spec(&["gcc", "make"]), Arch::X86_64, cache);
        assert_ne!(one, two);
        assert!(
            one.to_string_lossy().starts_with("/cache/roots/bullseye-amd64-"),
            "{}",
            one.display()
        );
        assert_eq!(one, root_path(&spec(&["gcc"]), Arch::X86_64, cache));
    }

    #[test]
    fn root_command_isolates_network_by_default() {
        let root = BuildRoot {
            path: PathBuf::from("/cache/roots/r"),
            arch: Arch::X86_64,
        };
        let offline = process::display(&root.command("make").arg("-j2").build());
        assert!(offline.contains("--unshare-net"), "{offline}");
        assert!(offline.ends_with("-- make -j2"), "{offline}");

        let online = process::display(&root.command("apt-get").network(true).build());
        assert!(!online.contains("--unshare-net"), "{online}");
        assert!(online.contains("--ro-bind /etc/resolv.conf"), "{online}");
    }
}
