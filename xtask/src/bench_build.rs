//! The build part of `cargo xtask bench`. It times a no-op `build-layers`.
//! It compares the library closure of the whole PHP tree with `ldd` run on
//! every file inside the build root, the method of Dockerfile pipelines.
//! And it compares the layer zips with Info-ZIP's `zip -r -9 --symlinks`
//! on the same trees.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::archive::{self, EntrySource};
use crate::build_root::{self, BuildRoot, RootRecipe};
use crate::compile::{self, CompileOptions, PhpBuild, Toolchain};
use crate::flags::LayerKind;
use crate::matrix::Definitions;
use crate::mirror::Mirrors;
use crate::{closure, host, layer, project_root, sources};

/// Runs of each measurement; the page gives the median.
const RUNS: usize = 5;

/// Figures of the build benchmark.
pub struct BuildFigures {
    pub noop: Duration,
    pub closure_files: usize,
    pub closure_libraries: usize,
    pub closure: Duration,
    pub ldd: Duration,
    pub zips: Vec<ZipFigures>,
    /// rayon's threads, which run our closure and zips.
    pub threads: usize,
}

/// One layer zipped both ways.
pub struct ZipFigures {
    pub layer: String,
    pub ours: Duration,
    pub ours_bytes: u64,
    pub info_zip: Duration,
    pub info_zip_bytes: u64,
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn time<T>(mut work: impl FnMut() -> Result<T>) -> Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        work()?;
        times.push(started.elapsed());
    }
    Ok(median(times))
}

/// Measures on the x86_64 build of the newest PHP release in the cache. The
/// first no-op run builds whatever is missing.
pub fn measure(definitions: &Definitions, cache_dir: &Path, debian_mirror: Option<&str>) -> Result<BuildFigures> {
    host::ensure(&[host::ZIP])?;
    let program = std::env::current_exe()?;
    let build_layers = || -> Result<()> {
        let status = Command::new(&program)
            .arg("build-layers")
            .arg("--cache-dir")
            .arg(cache_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("`cargo xtask build-layers` failed: run it alone to see why");
        }
        Ok(())
    };
    eprintln!("bench: build-layers, then {RUNS} no-op runs");
    build_layers()?;
    let noop = time(build_layers)?;

    let host_arch = build_root::host_arch()?;
    let target = definitions.target(host_arch);
    let recipe = RootRecipe::new(&definitions.build_root, target, host_arch)?;
    let root = build_root::find(&recipe, cache_dir).context("no build root after build-layers")?;
    let php = *definitions
        .default_releases()
        .last()
        .context("no PHP release is built by default")?;
    let release = &definitions.php[&php];
    let mirrors = Mirrors::discover(debian_mirror)?;
    let tarball = sources::fetch(release, &mirrors, cache_dir, true)?;
    let toolchain = Toolchain { target, cross: None };
    let options = CompileOptions {
        cache_dir,
        jobs: 1,
        force: false,
    };
    let build = compile::compile(definitions, release, &tarball, &root, &toolchain, &options)?;

    let files = php_tree_elf_files(&build)?;
    eprintln!(
        "bench: closure of {} ELF files, ours and ldd, {RUNS} runs each",
        files.len()
    );
    let policy = target.policy();
    let mut libraries = 0;
    let closure = time(|| {
        let found = closure::resolve_closure(&root.path, &files, &policy)?;
        libraries = found.libraries.len();
        Ok(())
    })?;
    let ldd = time(|| ldd_every_file(&root, &files))?;

    let mut zips = Vec::new();
    let work = tempfile::tempdir()?;
    for kind in LayerKind::ALL {
        let name = target.layer_name(definitions.kind(*kind), php);
        eprintln!("bench: zipping {name}, ours and Info-ZIP, {RUNS} runs each");
        let contents = layer::assemble(definitions, *kind, target, &build, &root, &project_root())?;
        let ours_zip = work.path().join(format!("{name}.zip"));
        let ours = time(|| archive::write_zip(&contents.entries, &ours_zip))?;
        let tree = work.path().join(&name);
        materialize(&contents.entries, &tree)?;
        let info_zip_path = work.path().join(format!("{name}-info-zip.zip"));
        let info_zip = time(|| {
            if info_zip_path.exists() {
                fs::remove_file(&info_zip_path)?;
            }
            let status = Command::new("zip")
                .args(["-r", "-9", "--symlinks", "-q"])
                .arg(&info_zip_path)
                .arg(".")
                .current_dir(&tree)
                .status()?;
            if !status.success() {
                bail!("zip failed on {}", tree.display());
            }
            Ok(())
        })?;
        zips.push(ZipFigures {
            layer: name,
            ours,
            ours_bytes: fs::metadata(&ours_zip)?.len(),
            info_zip,
            info_zip_bytes: fs::metadata(&info_zip_path)?.len(),
        });
        fs::remove_dir_all(&tree)?;
    }

    Ok(BuildFigures {
        noop,
        threads: rayon::current_num_threads(),
        closure_files: files.len(),
        closure_libraries: libraries,
        closure,
        ldd,
        zips,
    })
}

/// Returns every ELF file of the installed PHP tree: binaries and extensions.
fn php_tree_elf_files(build: &PhpBuild) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![build.prefix()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let mut magic = [0u8; 4];
                let is_elf = fs::File::open(entry.path())
                    .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic))
                    .is_ok()
                    && magic == *b"\x7fELF";
                if is_elf {
                    files.push(entry.path());
                }
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Runs `ldd` on every file inside the build root, in one shell, as a
/// Dockerfile step would.
fn ldd_every_file(root: &BuildRoot, files: &[PathBuf]) -> Result<()> {
    let inside: Vec<String> = files
        .iter()
        .map(|file| {
            let relative = file.strip_prefix(&root.path).expect("the files are in the root");
            format!("'/{}'", relative.display())
        })
        .collect();
    let script = format!("for file in {}; do ldd \"$file\" > /dev/null; done", inside.join(" "));
    let output = root.command("sh").args(["-c", &script]).build().output()?;
    if !output.status.success() {
        bail!("ldd failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// Writes the layer's entries as a directory tree for Info-ZIP.
fn materialize(entries: &[archive::Entry], tree: &Path) -> Result<()> {
    fs::create_dir_all(tree)?;
    for entry in entries {
        let path = tree.join(&entry.path);
        match &entry.source {
            EntrySource::Directory => fs::create_dir_all(&path)?,
            EntrySource::Symlink(target) => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                std::os::unix::fs::symlink(target, &path)?;
            }
            EntrySource::File(source) => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                fs::copy(source, &path).with_context(|| format!("cannot copy {}", source.display()))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(entry.mode))?;
            }
        }
    }
    Ok(())
}

pub fn render(figures: &BuildFigures) -> String {
    let mut page = String::new();
    let _ = writeln!(page, "## Build\n");
    let _ = writeln!(
        page,
        "`cargo xtask bench --only build`, medians of {RUNS} runs. Targets: a no-op `build-layers` under \
         2 s; the closure at least 20x faster than `ldd` and under 100 ms; zips not larger than \
         Info-ZIP's at `-9`, in at most half its time.\n"
    );
    let _ = writeln!(
        page,
        "- no-op `build-layers` (everything cached, both architectures; the xtask program alone, \
         without cargo's start-up): {:.2} s",
        figures.noop.as_secs_f64()
    );
    let _ = writeln!(
        page,
        "- library closure of the x86_64 PHP tree ({} ELF files, {} libraries): {:.1} ms with goblin and \
         rayon on {} threads, {:.1} ms with `ldd` on every file inside the build root (one `sh` loop in \
         bwrap, its start-up included): {:.0}x faster\n",
        figures.closure_files,
        figures.closure_libraries,
        figures.closure.as_secs_f64() * 1000.0,
        figures.threads,
        figures.ldd.as_secs_f64() * 1000.0,
        figures.ldd.as_secs_f64() / figures.closure.as_secs_f64()
    );
    let _ = writeln!(
        page,
        "Our zip deflates the files on {} threads; Info-ZIP uses one.\n",
        figures.threads
    );
    let _ = writeln!(
        page,
        "| layer | ours | Info-ZIP `zip -r -9 --symlinks` | time ratio | ours, bytes | Info-ZIP, bytes | size ratio |"
    );
    let _ = writeln!(page, "|---|---:|---:|---:|---:|---:|---:|");
    for zip in &figures.zips {
        let _ = writeln!(
            page,
            "| {} | {:.2} s | {:.2} s | {:.2} | {} | {} | {:.3} |",
            zip.layer,
            zip.ours.as_secs_f64(),
            zip.info_zip.as_secs_f64(),
            zip.ours.as_secs_f64() / zip.info_zip.as_secs_f64(),
            zip.ours_bytes,
            zip.info_zip_bytes,
            zip.ours_bytes as f64 / zip.info_zip_bytes as f64
        );
    }
    let _ = writeln!(page);
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle() {
        let ms = Duration::from_millis;
        assert_eq!(median(vec![ms(5), ms(1), ms(3)]), ms(3));
    }

    #[test]
    fn render_reports_ratios() {
        let ms = Duration::from_millis;
        let page = render(&BuildFigures {
            noop: ms(300),
            threads: 2,
            closure_files: 30,
            closure_libraries: 48,
            closure: ms(10),
            ldd: ms(400),
            zips: vec![ZipFigures {
                layer: "php-82".to_string(),
                ours: ms(1000),
                ours_bytes: 90,
                info_zip: ms(4000),
                info_zip_bytes: 100,
            }],
        });
        assert!(page.contains("0.30 s"), "{page}");
        assert!(page.contains("40x faster"), "{page}");
        assert!(page.contains("10.0 ms with goblin and rayon on 2 threads"), "{page}");
        assert!(page.contains("deflates the files on 2 threads"), "{page}");
        assert!(
            page.contains("| php-82 | 1.00 s | 4.00 s | 0.25 | 90 | 100 | 0.900 |"),
            "{page}"
        );
    }
}
