//! Isolated roots that hold glibc, decoy libraries and one unzipped layer.

use std::env;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::manifest::Layer;

/// Prefix of the environment variables naming the build root of an
/// architecture (`LAYERS_BUILD_ROOT_X86_64`); `cargo xtask test` sets them.
pub const BUILD_ROOT_VAR_PREFIX: &str = "LAYERS_BUILD_ROOT_";

/// Sonames that get no decoy although the base image has them: glibc
/// itself dlopens libgcc_s.so.1 from LD_LIBRARY_PATH (for thread
/// cancellation), where the real base image has a working copy.
const NO_DECOY: &[&str] = &["libgcc_s.so.1"];

/// Prefix of the environment variables naming the shell that replaces
/// the base image's `/bin/sh` (`LAYERS_TEST_SHELL_ARM64`). `cargo xtask
/// test` sets them.
pub const TEST_SHELL_VAR_PREFIX: &str = "LAYERS_TEST_SHELL_";

/// qemu-user, which runs the programs of a foreign architecture.
const QEMU_AARCH64: &str = "/usr/bin/qemu-aarch64-static";

/// binfmt_misc entry for aarch64 ELF executables. The `F` flag opens qemu
/// when the entry is registered, so it works inside roots that lack it.
/// The kernel decodes the `\x` escapes itself.
const BINFMT_AARCH64: &str = concat!(
    r":qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
    r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    ":/usr/bin/qemu-aarch64-static:F"
);

/// Mounts a binfmt_misc instance of its own in a new user namespace,
/// registers qemu there, then runs its arguments. Since Linux 6.7 each user
/// namespace can have its own binfmt_misc, so the host's stays untouched,
/// and the namespaces bwrap creates below this one inherit the entry.
const WITH_BINFMT_SCRIPT: &str = r#"
mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || {
    echo "cannot mount binfmt_misc in a user namespace (this needs Linux 6.7 or later)" >&2
    exit 125
}
printf '%s' "$BINFMT_ENTRY" > /proc/sys/fs/binfmt_misc/register || exit 125
unset BINFMT_ENTRY
exec "$@"
"#;

/// The user Lambda runs functions as is not root; php-fpm refuses root.
const SANDBOX_UID: &str = "993";
const SANDBOX_GID: &str = "990";

/// A layer unzipped into an isolated root.
pub struct LayerRoot {
    _dir: TempDir,
    /// The root directory: becomes `/`.
    pub root: PathBuf,
    /// The unzipped layer: becomes `/opt`, read-only.
    pub opt: PathBuf,
    /// Becomes `/tmp`, writable, reachable from the host (for sockets).
    pub tmp: PathBuf,
    /// Becomes `/var/task`, read-only: the function's code and ini files.
    pub task: PathBuf,
    /// Sonames that have a decoy in `/lib64`.
    pub decoys: Vec<String>,
    /// Lambda's LD_LIBRARY_PATH on the layer's target.
    ld_library_path: String,
    /// Set when the layer is for another architecture than this machine's:
    /// the qemu-user binary that runs its programs.
    emulator: Option<PathBuf>,
}

/// How a command runs in a root, beyond the defaults of [`LayerRoot::command`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Shares the host's network namespace, so the command reaches servers
    /// the test starts on 127.0.0.1. Off by default.
    pub share_network: bool,
    /// Environment variables added to Lambda's.
    pub env: Vec<(String, String)>,
}

impl Options {
    pub fn network() -> Options {
        Options {
            share_network: true,
            env: Vec::new(),
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Options {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

/// Exit status and output of a command run in a root.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl LayerRoot {
    /// Unzips `layer` and builds its isolated root.
    pub fn new(layer: &Layer) -> Result<LayerRoot> {
        let dir = tempfile::Builder::new().prefix("layer-root-").tempdir()?;
        let root = dir.path().join("root");
        let opt = dir.path().join("opt");
        let tmp = dir.path().join("tmp");
        let task = dir.path().join("task");
        for path in [&root, &opt, &tmp, &task] {
            fs::create_dir_all(path)?;
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;

        unzip(&layer.zip_path(), &opt)?;
        let build_root = build_root(&layer.architecture)?;
        install_glibc(&build_root, &root, layer)?;
        let decoys = install_decoys(layer, &build_root, &root.join("lib64"), dir.path())?;
        let emulator = emulator(&layer.architecture)?;
        for mount_point in ["opt", "tmp", "var/task", "proc", "dev", "etc", "bin"] {
            fs::create_dir_all(root.join(mount_point))?;
        }
        let shell = test_shell(&layer.architecture)?;
        fs::copy(&shell, root.join("bin/sh"))
            .with_context(|| format!("cannot copy {} into the test root", shell.display()))?;

        Ok(LayerRoot {
            _dir: dir,
            root,
            opt,
            tmp,
            task,
            decoys,
            ld_library_path: layer.ld_library_path.clone(),
            emulator,
        })
    }

    /// Returns the command that runs `program` inside the root, as Lambda
    /// would: no network, a non-root user, Lambda's library path and task
    /// root, and nothing of the host's environment.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        self.command_with(program, args, &Options::default())
    }

    /// Like [`LayerRoot::command`], with network access or more variables.
    ///
    /// Programs of another architecture run under qemu-user through a
    /// binfmt_misc entry registered in a user namespace of their own, so
    /// that they can start other programs, as /opt/bootstrap does.
    pub fn command_with(&self, program: &str, args: &[&str], options: &Options) -> Command {
        let mut command = if self.emulator.is_some() {
            let mut command = Command::new("unshare");
            command
                .args([
                    "--user",
                    "--map-root-user",
                    "--mount",
                    "--",
                    "/bin/sh",
                    "-c",
                    WITH_BINFMT_SCRIPT,
                ])
                .arg("with-binfmt")
                .env("BINFMT_ENTRY", BINFMT_AARCH64)
                .arg("bwrap");
            command
        } else {
            Command::new("bwrap")
        };
        command
            .arg("--bind")
            .arg(&self.root)
            .arg("/")
            .arg("--ro-bind")
            .arg(&self.opt)
            .arg("/opt")
            .arg("--bind")
            .arg(&self.tmp)
            .arg("/tmp")
            .arg("--ro-bind")
            .arg(&self.task)
            .arg("/var/task")
            .args(["--proc", "/proc", "--dev", "/dev"])
            .args([
                "--unshare-all",
                "--unshare-user",
                "--uid",
                SANDBOX_UID,
                "--gid",
                SANDBOX_GID,
            ]);
        if options.share_network {
            command.arg("--share-net");
        }
        command
            .args(["--die-with-parent", "--clearenv"])
            .arg("--setenv")
            .arg("LD_LIBRARY_PATH")
            .arg(&self.ld_library_path)
            .args(["--setenv", "PATH", "/opt/bin:/usr/local/bin:/usr/bin:/bin"])
            .args(["--setenv", "LAMBDA_TASK_ROOT", "/var/task"])
            .args(["--setenv", "HOME", "/tmp"])
            .args(["--setenv", "OPENSSL_CONF", "/opt/bref/ssl/openssl.cnf"]);
        for (key, value) in &options.env {
            command.arg("--setenv").arg(key).arg(value);
        }
        command.arg("--").arg(program).args(args);
        command
    }

    /// Runs `program` inside the root and waits for it.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let output = self
            .command(program, args)
            .stdin(Stdio::null())
            .output()
            .expect("failed to start bwrap");
        Output {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Writes a file into the function's task root (`/var/task`).
    pub fn add_task_file(&self, relative: &str, contents: &[u8]) {
        let path = self.task.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, contents).unwrap();
    }

    /// Deletes a bundled library from the layer: its soname link and the
    /// file it points to. Returns the paths removed.
    pub fn remove_library(&self, soname: &str) -> Vec<PathBuf> {
        let link = self.opt.join("lib").join(soname);
        let mut removed = Vec::new();
        if let Ok(target) = fs::read_link(&link) {
            let file = self.opt.join("lib").join(target);
            fs::remove_file(&file).unwrap();
            removed.push(file);
        }
        fs::remove_file(&link).unwrap_or_else(|error| panic!("cannot remove {}: {error}", link.display()));
        removed.push(link);
        removed
    }
}

/// Returns the replacement for the base image's `/bin/sh`: Debian's dash for the
/// layer's architecture, which `cargo xtask test` downloads.
fn test_shell(architecture: &str) -> Result<PathBuf> {
    path_from_env(TEST_SHELL_VAR_PREFIX, architecture, "the /bin/sh of the test roots")
}

/// The build root whose glibc the test roots use.
fn build_root(architecture: &str) -> Result<PathBuf> {
    path_from_env(
        BUILD_ROOT_VAR_PREFIX,
        architecture,
        "the build root whose glibc the test roots use",
    )
}

/// Reads the path in the variable `<prefix><ARCHITECTURE>` and checks that it exists.
fn path_from_env(prefix: &str, architecture: &str, what: &str) -> Result<PathBuf> {
    let variable = format!("{prefix}{}", architecture.to_uppercase());
    let path = env::var_os(&variable)
        .map(PathBuf::from)
        .with_context(|| format!("{variable} is not set: it names {what}; run `cargo xtask test`"))?;
    if !path.exists() {
        bail!("{variable}={} does not exist", path.display());
    }
    Ok(path)
}

fn unzip(zip_path: &Path, into: &Path) -> Result<()> {
    let file = File::open(zip_path).with_context(|| format!("cannot open {}", zip_path.display()))?;
    let mut archive = zip::ZipArchive::new(file)?;
    archive
        .extract(into)
        .with_context(|| format!("cannot unzip {}", zip_path.display()))
}

fn debian_arch(architecture: &str) -> &'static str {
    match architecture {
        "x86_64" => "amd64",
        "arm64" => "arm64",
        other => panic!("unknown architecture {other}"),
    }
}

fn gnu_triplet(architecture: &str) -> &'static str {
    match architecture {
        "x86_64" => "x86_64-linux-gnu",
        "arm64" => "aarch64-linux-gnu",
        other => panic!("unknown architecture {other}"),
    }
}

/// Returns the qemu-user binary for a layer of `architecture`, or `None`
/// when this machine runs its programs natively.
fn emulator(architecture: &str) -> Result<Option<PathBuf>> {
    let native = matches!(
        (architecture, env::consts::ARCH),
        ("x86_64", "x86_64") | ("arm64", "aarch64")
    );
    if native {
        return Ok(None);
    }
    if architecture != "arm64" {
        bail!(
            "no emulator known for {architecture} layers on this {} machine",
            env::consts::ARCH
        );
    }
    let path = PathBuf::from(QEMU_AARCH64);
    if !path.is_file() {
        bail!(
            "{} is missing: install qemu-user-static, or run `cargo xtask test`, which does",
            path.display()
        );
    }
    Ok(Some(path))
}

/// Copies the files of the build root's libc6 package: its shared
/// libraries into /lib64, as Lambda has them, its loader also at the
/// target's PT_INTERP path, and its gconv modules to the path this glibc
/// was compiled to look in.
fn install_glibc(build_root: &Path, root: &Path, layer: &Layer) -> Result<()> {
    let architecture = layer.architecture.as_str();
    let list_path = build_root.join(format!("var/lib/dpkg/info/libc6:{}.list", debian_arch(architecture)));
    let list = fs::read_to_string(&list_path).with_context(|| format!("cannot read {}", list_path.display()))?;
    let library_dir = format!("/lib/{}/", gnu_triplet(architecture));
    let gconv_dir = format!("/usr/lib/{}/gconv/", gnu_triplet(architecture));

    let lib64 = root.join("lib64");
    fs::create_dir_all(&lib64)?;
    for path in list.lines() {
        let source = build_root.join(path.trim_start_matches('/'));
        if !source.is_file() {
            continue;
        }
        let destination = if let Some(name) = path.strip_prefix(&library_dir) {
            if !name.contains(".so") {
                continue;
            }
            lib64.join(name)
        } else if path.starts_with(&gconv_dir) {
            root.join(path.trim_start_matches('/'))
        } else {
            continue;
        };
        fs::create_dir_all(destination.parent().unwrap())?;
        fs::copy(&source, &destination)
            .with_context(|| format!("cannot copy {} to {}", source.display(), destination.display()))?;
    }
    if !lib64.join("libc.so.6").exists() {
        bail!("{} lists no libc.so.6 under {library_dir}", list_path.display());
    }
    let loader = root.join(layer.loader.trim_start_matches('/'));
    if !loader.exists() {
        let name = loader.file_name().context("the loader path has no file name")?;
        fs::create_dir_all(loader.parent().unwrap())?;
        std::os::unix::fs::symlink(Path::new("/lib64").join(name), &loader)?;
    }

    // Lambda's image has a UTF-8 locale, which PHP selects for LC_CTYPE at
    // startup; iconv's //TRANSLIT needs it for most letters.
    copy_tree(&build_root.join(LOCALE_DIR), &root.join(LOCALE_DIR))
}

/// The C.UTF-8 locale, at the path Debian's glibc looks for it.
const LOCALE_DIR: &str = "usr/lib/locale/C.UTF-8";

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))? {
        let entry = entry?;
        let destination = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &destination)?;
        } else {
            fs::copy(entry.path(), &destination)?;
        }
    }
    Ok(())
}

/// Puts an empty shared library into `lib64` for every bundled library
/// whose soname the real base image also has. The decoys are built with the
/// build root's compiler for the layer's architecture: the loader skips a
/// library of another architecture, which would prove nothing.
fn install_decoys(layer: &Layer, build_root: &Path, lib64: &Path, work: &Path) -> Result<Vec<String>> {
    let decoy_dir = work.join("decoys");
    fs::create_dir_all(&decoy_dir)?;
    fs::write(
        decoy_dir.join("decoy.c"),
        "int php_lambda_layers_decoy(void) { return 0; }\n",
    )?;
    let compiler = format!("{}-gcc", gnu_triplet(&layer.architecture));

    let mut decoys = Vec::new();
    for library in &layer.libraries {
        if !library.shadows_base_image || NO_DECOY.contains(&library.soname.as_str()) {
            continue;
        }
        let output = Command::new("bwrap")
            .arg("--ro-bind")
            .arg(build_root)
            .arg("/")
            .args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
            .arg("--bind")
            .arg(&decoy_dir)
            .arg("/tmp/decoys")
            .args(["--unshare-all", "--"])
            .arg(&compiler)
            .args(["-shared", "-fPIC", "-nostdlib", "-o"])
            .arg(format!("/tmp/decoys/{}", library.soname))
            .arg(format!("-Wl,-soname,{}", library.soname))
            .arg("/tmp/decoys/decoy.c")
            .output()
            .context("cannot run bwrap to build the decoy libraries")?;
        if !output.status.success() {
            bail!(
                "{compiler} failed to build the decoy {}: {}",
                library.soname,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        fs::rename(decoy_dir.join(&library.soname), lib64.join(&library.soname))?;
        decoys.push(library.soname.clone());
    }
    Ok(decoys)
}

/// A program started in a root, whose output is collected as it comes.
/// Dropping it kills the sandbox.
pub struct Spawned {
    child: Child,
    /// stdout and stderr interleaved by line, as CloudWatch Logs shows them.
    log: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl LayerRoot {
    /// Starts `program` in the root. Its stdout and stderr both go to the
    /// collected log, as Lambda sends both to CloudWatch Logs.
    pub fn spawn(&self, program: &str, args: &[&str], options: &Options) -> Result<Spawned> {
        let mut child = self
            .command_with(program, args, options)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start bwrap")?;
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let out_pipe = child.stdout.take().map(|pipe| Box::new(pipe) as Box<dyn Read + Send>);
        let err_pipe = child.stderr.take().map(|pipe| Box::new(pipe) as Box<dyn Read + Send>);
        let mut readers = Vec::new();
        for (pipe, only) in [(out_pipe, Some(stdout.clone())), (err_pipe, None)] {
            let Some(pipe) = pipe else { continue };
            let log = log.clone();
            readers.push(thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    for buffer in std::iter::once(&log).chain(only.as_ref()) {
                        let mut buffer = buffer.lock().unwrap();
                        buffer.push_str(&line);
                        buffer.push('\n');
                    }
                }
            }));
        }
        Ok(Spawned {
            child,
            log,
            stdout,
            readers,
        })
    }
}

impl Spawned {
    /// Everything the program wrote so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Returns what the program wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle` and returns whether it did.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.log().contains(needle)
    }

    /// Waits for the program to exit and returns its exit code, or `None`
    /// if it still runs after `timeout` (or died from a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return Some(status.code());
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // bwrap runs with --die-with-parent semantics for its own child:
        // killing bwrap ends everything inside the sandbox.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
