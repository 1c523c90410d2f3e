//! The Debian build root: a debootstrapped tree with an old enough glibc,
//! created once per architecture and package set, and the sandbox that runs
//! commands inside it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::flags::Arch;
use crate::host;
use crate::matrix::{BuildRootSpec, Target};
use crate::mirror::Mirrors;
use crate::process;
use crate::stage::READY_MARKER;

/// A complete build root on the host.
#[derive(Debug, Clone)]
pub struct BuildRoot {
    pub path: PathBuf,
    pub arch: Arch,
}

/// Recipe of a build root: the Debian suite, the architecture of the
/// machine that runs it, and the packages to install.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RootRecipe {
    pub suite: String,
    /// Architecture the root's programs run on (the build machine's).
    pub host: Arch,
    /// Architecture the root compiles for.
    pub target: Arch,
    /// Packages to install, `name:arch` for the target's when cross-compiling.
    pub packages: Vec<String>,
}

impl RootRecipe {
    /// Returns the recipe of the root that builds for `target` on a machine
    /// of `host` architecture.
    pub fn new(spec: &BuildRootSpec, target: &Target, host: Arch) -> Result<RootRecipe> {
        let mut packages = spec.tools.clone();
        if target.is_cross(host) {
            let cross = target.cross.as_ref().with_context(|| {
                format!(
                    "cannot build for {} on this {host} machine: layers/targets/al2023-{}.toml has no [cross] section",
                    target.arch, target.arch
                )
            })?;
            packages.extend(cross.packages.iter().cloned());
            let suffix = format!(":{}", target.arch.debian_name());
            packages.extend(spec.libraries.iter().map(|library| format!("{library}{suffix}")));
        } else {
            packages.extend(spec.libraries.iter().cloned());
        }
        Ok(RootRecipe {
            suite: spec.suite.clone(),
            host,
            target: target.arch,
            packages,
        })
    }

    fn is_cross(&self) -> bool {
        self.host != self.target
    }

    /// Returns where the root lives: a new package list gives a new root.
    fn path(&self, cache_dir: &Path) -> PathBuf {
        let mut hasher = Sha256::new();
        hasher.update(self.suite.as_bytes());
        hasher.update(self.host.debian_name().as_bytes());
        for package in &self.packages {
            hasher.update(b"\0");
            hasher.update(package.as_bytes());
        }
        let digest = hasher.finalize();
        let key = crate::sources::hex(&digest[..6]);
        cache_dir
            .join("roots")
            .join(format!("{}-{}-{key}", self.suite, self.target.debian_name()))
    }
}

/// Returns the architecture of this machine.
pub fn host_arch() -> Result<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(Arch::X86_64),
        "aarch64" => Ok(Arch::Arm64),
        other => bail!("unsupported build machine architecture {other}: build on x86_64 or aarch64"),
    }
}

/// Removes the root of `recipe`, with the PHP builds inside it, so that the
/// next [`ensure`] creates it again.
pub fn remove(recipe: &RootRecipe, cache_dir: &Path) -> Result<()> {
    let path = recipe.path(cache_dir);
    if path.exists() {
        eprintln!(
            "build root {} ({}): removing {} (--force)",
            recipe.suite,
            recipe.target,
            path.display()
        );
        fs::remove_dir_all(&path).with_context(|| format!("failed to remove {}", path.display()))?;
    }
    Ok(())
}

/// Returns the cached build root of `recipe`, creating it first when the
/// cache has none.
///
/// The root is assembled in a `.partial` directory and renamed into place
/// only when every package is installed, so an interrupted run never leaves
/// a root that looks complete.
pub fn ensure(recipe: &RootRecipe, mirrors: &Mirrors, cache_dir: &Path) -> Result<BuildRoot> {
    let path = recipe.path(cache_dir);
    let arch = recipe.target;
    let root = BuildRoot {
        path: path.clone(),
        arch,
    };
    if path.join(READY_MARKER).exists() {
        eprintln!("build root {} ({arch}): cached at {}", recipe.suite, path.display());
        return Ok(root);
    }

    host::ensure(&[host::DEBOOTSTRAP, host::BWRAP])?;
    let mirror = mirrors
        .uri_for(&recipe.suite)
        .with_context(|| format!("no Debian mirror known for {}; pass --debian-mirror", recipe.suite))?;
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
        recipe.suite,
        log.display()
    );
    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .arg("--variant=minbase")
        .arg(format!("--arch={}", recipe.host.debian_name()))
        .arg(&recipe.suite)
        .arg(&partial)
        .arg(&mirror);
    process::run_logged(debootstrap, &log)?;

    let partial_root = BuildRoot {
        path: partial.clone(),
        arch,
    };
    if recipe.is_cross() {
        let add_architecture = partial_root
            .command("dpkg")
            .arg("--add-architecture")
            .arg(recipe.target.debian_name());
        add_architecture.run_logged(&log)?;
    }
    let update = partial_root
        .command("apt-get")
        .network(true)
        .args(["update", "--quiet"]);
    update.run_logged(&log)?;
    let install = partial_root
        .command("apt-get")
        .network(true)
        .args(["install", "--yes", "--quiet", "--no-install-recommends"])
        .args(recipe.packages.iter().map(String::as_str));
    install.run_logged(&log)?;
    partial_root.command("apt-get").arg("clean").run_logged(&log)?;

    fs::write(partial.join(READY_MARKER), serde_json::to_string_pretty(recipe)?)?;
    fs::rename(&partial, &path)
        .with_context(|| format!("failed to move {} to {}", partial.display(), path.display()))?;
    eprintln!(
        "build root {} ({arch}): ready in {:.0} s",
        recipe.suite,
        started.elapsed().as_secs_f64()
    );
    Ok(root)
}

/// Returns the finished build root of `recipe`, if the cache has one.
pub fn find(recipe: &RootRecipe, cache_dir: &Path) -> Option<BuildRoot> {
    let path = recipe.path(cache_dir);
    path.join(READY_MARKER).exists().then_some(BuildRoot {
        path,
        arch: recipe.target,
    })
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
            binds: Vec::new(),
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
    /// Host paths bound read-only inside the root, with their place there.
    binds: Vec<(PathBuf, String)>,
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

    /// Binds the host file `host` read-only at `inside` in the root.
    pub fn bind_ro(mut self, host: &Path, inside: &str) -> Self {
        self.binds.push((host.to_path_buf(), inside.to_string()));
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
        let summary = format!("[{root_name}] {}", process::display(&inside));
        process::run_logged_as(self.build(), &summary, log)
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
        for (host, inside) in &self.binds {
            command.arg("--ro-bind").arg(host).arg(inside);
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
    use crate::matrix::Definitions;

    fn definitions() -> Definitions {
        Definitions::load(&crate::project_root().join("layers")).unwrap()
    }

    #[test]
    fn native_recipe_installs_plain_packages() {
        let definitions = definitions();
        let recipe = RootRecipe::new(&definitions.build_root, definitions.target(Arch::X86_64), Arch::X86_64).unwrap();
        assert!(recipe.packages.contains(&"libonig-dev".to_string()));
        assert!(!recipe.packages.iter().any(|package| package.contains(':')));
        assert!(!recipe.is_cross());
    }

    #[test]
    fn cross_recipe_installs_target_libraries() {
        let definitions = definitions();
        let recipe = RootRecipe::new(&definitions.build_root, definitions.target(Arch::Arm64), Arch::X86_64).unwrap();
        assert!(recipe.packages.contains(&"libonig-dev:arm64".to_string()));
        assert!(recipe.packages.contains(&"crossbuild-essential-arm64".to_string()));
        assert!(recipe.packages.contains(&"bison".to_string()));
        assert!(recipe.is_cross());
    }

    #[test]
    fn cross_without_section_is_rejected() {
        let mut definitions = definitions();
        definitions.targets.get_mut(&Arch::X86_64).unwrap().cross = None;
        let target = definitions.target(Arch::X86_64);
        let error = RootRecipe::new(&definitions.build_root, target, Arch::Arm64)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no [cross] section"), "{error}");
    }

    #[test]
    fn root_path_changes_with_packages() {
        let definitions = definitions();
        let cache = Path::new("/cache");
        let mut recipe =
            RootRecipe::new(&definitions.build_root, definitions.target(Arch::X86_64), Arch::X86_64).unwrap();
        let one = recipe.path(cache);
        recipe.packages.push("make".into());
        let two = recipe.path(cache);
        assert_ne!(one, two);
        assert!(
            one.to_string_lossy().starts_with("/cache/roots/bullseye-amd64-"),
            "{}",
            one.display()
        );
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
