//! `cargo xtask build-layers`: for each selected PHP version, architecture
//! and layer kind, fetch the source, compile PHP in the build root, collect
//! the shared-library closure, assemble the layer and write its zip.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::archive::{self, Entry, EntrySource, ZipSummary};
use crate::build_root::RootRecipe;
use crate::compile::{Cross, Toolchain};
use crate::flags::{Arch, BuildLayersArgs, LayerKind, PhpMinor};
use crate::layer::{self, BundledLibraryRecord};
use crate::matrix::{Definitions, ModuleList, PhpRelease, Target};
use crate::mirror::Mirrors;
use crate::stage::{self, Stage};
use crate::{build_root, compile, host, project_root, sources};

/// Lambda's limit on the unzipped size of a function and all its layers, in bytes.
pub const MAX_UNZIPPED_BYTES: u64 = 262_144_000;

/// Largest zip that PublishLayerVersion accepts inline (50 MiB); larger
/// ones must be uploaded through S3.
pub const MAX_INLINE_ZIP_BYTES: u64 = 50 * 1024 * 1024;

/// The runtime every layer is compatible with.
pub const COMPATIBLE_RUNTIME: &str = "provided.al2023";

/// File name of the manifest in the output directory.
pub const MANIFEST_NAME: &str = "manifest.json";

/// `manifest.json`: what each zip in the output directory contains.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub layers: Vec<ManifestLayer>,
}

/// One built layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestLayer {
    pub name: String,
    pub kind: LayerKind,
    pub architecture: Arch,
    pub php_version: String,
    pub description: String,
    pub compatible_runtimes: Vec<String>,
    /// Lambda's architecture name, for `CompatibleArchitectures`.
    pub compatible_architectures: Vec<String>,
    /// Newest glibc symbol version the layer's objects may need.
    pub glibc_max: String,
    /// Lambda's LD_LIBRARY_PATH on the target, for the acceptance tests.
    pub ld_library_path: String,
    /// Path of the target's dynamic loader, for the acceptance tests.
    pub loader: String,
    /// File name of the zip in the output directory.
    pub zip: String,
    pub sha256: String,
    /// Base64 sha256, as Lambda's `CodeSha256`.
    pub code_sha256: String,
    pub zip_bytes: u64,
    pub unzipped_bytes: u64,
    /// Modules that `php -m` lists with the layer's own ini files.
    pub modules: ExpectedModules,
    /// Shared extensions that ship disabled, with their file names.
    pub disabled_extensions: BTreeMap<String, String>,
    pub libraries: Vec<LibraryRecord>,
    /// Key of everything the layer was built from; an unchanged key lets
    /// the next build keep the zip.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub inputs_key: String,
    /// The last passed acceptance test of this zip, which `cargo xtask
    /// publish` requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceptance: Option<Acceptance>,
}

/// A passed run of `cargo xtask test` over a zip.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Acceptance {
    /// The sha256 (hex) of the zip the tests passed on.
    pub zip_sha256: String,
    /// When, in RFC 3339 UTC.
    pub passed_at: String,
}

/// The module names of `php -m`, split in its two sections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExpectedModules {
    pub php: Vec<String>,
    pub zend: Vec<String>,
}

impl From<ModuleList> for ExpectedModules {
    fn from(list: ModuleList) -> Self {
        ExpectedModules {
            php: list.php_modules.into_iter().collect(),
            zend: list.zend_modules.into_iter().collect(),
        }
    }
}

/// A bundled library in manifest.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LibraryRecord {
    pub soname: String,
    pub file: String,
    pub shadows_base_image: bool,
    pub needed_by: Vec<String>,
}

impl From<BundledLibraryRecord> for LibraryRecord {
    fn from(record: BundledLibraryRecord) -> Self {
        LibraryRecord {
            soname: record.soname,
            file: record.file,
            shadows_base_image: record.shadows_base_image,
            needed_by: record.needed_by,
        }
    }
}

/// Layers and compiled PHP of one run.
#[derive(Debug, Default)]
pub struct Built {
    /// The manifest entries of the layers, built or kept.
    pub layers: Vec<ManifestLayer>,
    /// The compiled PHP of each selected cell.
    pub compiled: Vec<CompiledCell>,
}

/// A compiled PHP of one release and architecture.
#[derive(Debug, Clone)]
pub struct CompiledCell {
    pub release: PhpMinor,
    pub arch: Arch,
    pub build: compile::PhpBuild,
    pub root: build_root::BuildRoot,
    /// Whether the build machine runs the binaries through qemu.
    pub cross: bool,
}

/// The resolved selection and locations of one run.
struct Plan {
    php: Vec<PhpMinor>,
    arches: Vec<Arch>,
    kinds: Vec<LayerKind>,
    out_dir: PathBuf,
    cache_dir: PathBuf,
    jobs: usize,
    /// Whether sources may come from the URLs under layers/php/.
    use_urls: bool,
    until: Option<Stage>,
    force: Option<Stage>,
    /// The verified source tarball of each release, fetched before any
    /// build root.
    tarballs: BTreeMap<PhpMinor, PathBuf>,
}

impl Plan {
    /// Returns whether `stage` runs even when its result is cached.
    fn forced(&self, stage: Stage) -> bool {
        self.force.is_some_and(|from| from <= stage)
    }

    /// Returns whether the run stops before `stage`.
    fn stops_before(&self, stage: Stage) -> bool {
        self.until.is_some_and(|last| last < stage)
    }
}

/// Builds the selected layers and returns their manifest entries.
///
/// Architectures build independently: when one fails, the others still
/// finish and their zips and manifest entries are kept, and the run fails
/// afterwards, naming each failed architecture.
pub fn run(args: &BuildLayersArgs) -> Result<Built> {
    let started = Instant::now();
    let project = project_root();
    let definitions = Definitions::load(&project.join("layers"))?;
    let mut plan = plan(args, &definitions, &project)?;
    // The closure and the zips run on rayon's global pool. It is built once
    // per process, so a pool that already runs (in a test) is kept.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(plan.jobs).build_global();
    host::ensure(&[host::DEBOOTSTRAP, host::BWRAP, host::XZ])?;
    let mirrors = Mirrors::discover(args.common.debian_mirror.as_deref())?;
    let host = build_root::host_arch()?;

    // Every source first: a missing one fails the run before any build root
    // or compile starts.
    let mut missing = Vec::new();
    for php in &plan.php {
        let release = &definitions.php[php];
        // A forced fetch keeps the cached tarball aside until a new one
        // is verified: a tarball put there by hand may have no other source.
        let cached = plan.cache_dir.join("sources").join(release.tarball_name());
        let previous = cached.with_extension("xz.previous");
        if plan.forced(Stage::Sources) && cached.exists() {
            fs::rename(&cached, &previous).with_context(|| format!("failed to move {} aside", cached.display()))?;
        }
        match sources::fetch(release, &mirrors, &plan.cache_dir, plan.use_urls) {
            Ok(tarball) => {
                if previous.exists() {
                    fs::remove_file(&previous)?;
                }
                plan.tarballs.insert(*php, tarball);
            }
            Err(error) => {
                if previous.exists() {
                    fs::rename(&previous, &cached)?;
                    eprintln!(
                        "source php-{}: kept the cached tarball, since no new one could be fetched",
                        release.version
                    );
                }
                missing.push(format!("{error:#}"));
            }
        }
    }
    if !missing.is_empty() {
        bail!("{}", missing.join("\n"));
    }
    if plan.stops_before(Stage::Root) {
        eprintln!("build-layers: stopped after the sources (--until sources)");
        return Ok(Built::default());
    }

    if !plan.stops_before(Stage::Layers) {
        let removed = archive::remove_partial_files(&plan.out_dir)?;
        if removed > 0 {
            let files = if removed == 1 { "file" } else { "files" };
            eprintln!(
                "build-layers: removed {removed} partial {files} that an interrupted run left in {}",
                plan.out_dir.display()
            );
        }
    }

    let mut built = Built::default();
    let mut failures = Vec::new();
    for &arch in &plan.arches {
        let mut outcome = Built::default();
        let result = build_arch(
            &definitions,
            &plan,
            &mirrors,
            &project,
            (host, arch),
            &built.compiled,
            &mut outcome,
        );
        // Recorded at once, even after a failure, so that the zips written
        // so far and a later interruption keep this architecture's layers
        // listed.
        if !outcome.layers.is_empty() {
            write_manifest(&plan.out_dir, &outcome.layers)?;
        }
        built.layers.extend(outcome.layers);
        built.compiled.extend(outcome.compiled);
        if let Err(error) = result {
            eprintln!("error: building for {arch} failed: {error:#}");
            failures.push(format!("{arch}: {error:#}"));
        }
    }

    if !built.layers.is_empty() {
        print_summary(&built.layers, &plan.out_dir);
    } else if let Some(until) = plan.until {
        eprintln!("build-layers: stopped after the {until} stage (--until {until})");
    }
    eprintln!("build-layers: done in {:.1} s", started.elapsed().as_secs_f64());
    if !failures.is_empty() {
        bail!(
            "{} of {} architectures failed; the layers of the others are in {}:\n{}",
            failures.len(),
            plan.arches.len(),
            plan.out_dir.display(),
            failures.join("\n")
        );
    }
    Ok(built)
}

/// Builds every selected layer of one architecture on the `host` machine.
/// `earlier` contains the PHP builds of the architectures built before.
fn build_arch(
    definitions: &Definitions,
    plan: &Plan,
    mirrors: &Mirrors,
    project: &Path,
    (host, arch): (Arch, Arch),
    earlier: &[CompiledCell],
    built: &mut Built,
) -> Result<()> {
    let target = definitions.target(arch);
    let recipe = RootRecipe::new(&definitions.build_root, target, host)?;
    if plan.forced(Stage::Root) {
        build_root::remove(&recipe, &plan.cache_dir)?;
    }
    let root = build_root::ensure(&recipe, mirrors, &plan.cache_dir)
        .with_context(|| format!("failed to prepare the {arch} build root"))?;
    if plan.stops_before(Stage::Php) {
        return Ok(());
    }
    let previous = read_manifest(&plan.out_dir);

    // PHP versions compile side by side when there are cores for it, with
    // the make jobs shared out so that the machine is not oversubscribed.
    let (parallel, jobs) = cell_slots(plan.php.len(), plan.jobs);
    let queue = Mutex::new(plan.php.iter());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..parallel {
            scope.spawn(|| loop {
                let Some(php) = lock(&queue).next() else {
                    return;
                };
                let mut cell = Built::default();
                let cell_context = CellContext {
                    definitions,
                    plan,
                    mirrors,
                    project,
                    host,
                    arch,
                    root: &root,
                    previous: &previous,
                    compiled: earlier,
                };
                let result = build_cell(&cell_context, *php, jobs, &mut cell);
                lock(&results).push((*php, cell, result));
            });
        }
    });

    let mut results = results.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    results.sort_by_key(|(php, _, _)| *php);
    let mut first_error = None;
    for (_, cell, result) in results {
        built.layers.extend(cell.layers);
        built.compiled.extend(cell.compiled);
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Returns how many cells run at once and the make jobs of each: one cell
/// per job at most, and every job used.
fn cell_slots(cells: usize, jobs: usize) -> (usize, usize) {
    let parallel = cells.min(jobs).max(1);
    (parallel, (jobs / parallel).max(1))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Inputs shared by the cells of one architecture.
struct CellContext<'a> {
    definitions: &'a Definitions,
    plan: &'a Plan,
    mirrors: &'a Mirrors,
    project: &'a Path,
    host: Arch,
    arch: Arch,
    root: &'a build_root::BuildRoot,
    /// The manifest before this run, for the layers kept.
    previous: &'a Manifest,
    /// The PHP builds made earlier in this run, which a cross compile
    /// takes its native build from.
    compiled: &'a [CompiledCell],
}

/// Compiles one PHP version for the context's architecture and builds its
/// layers into `built`.
fn build_cell(context: &CellContext, php: PhpMinor, jobs: usize, built: &mut Built) -> Result<()> {
    let CellContext {
        definitions,
        plan,
        project,
        arch,
        root,
        previous,
        ..
    } = *context;
    let target = definitions.target(arch);
    let release = &definitions.php[&php];
    let tarball = plan.tarballs[&php].clone();
    let toolchain = toolchain(context, target, release, &tarball, jobs)?;
    let build = compile::compile(
        definitions,
        release,
        &tarball,
        root,
        &toolchain,
        &compile::CompileOptions {
            cache_dir: &plan.cache_dir,
            jobs,
            force: plan.forced(Stage::Php),
        },
    )
    .with_context(|| format!("failed to compile PHP {} for {arch}", release.version))?;
    built.compiled.push(CompiledCell {
        release: php,
        arch,
        build: build.clone(),
        root: root.clone(),
        cross: toolchain.cross.is_some(),
    });
    if plan.stops_before(Stage::Layers) {
        return Ok(());
    }

    for &kind in &plan.kinds {
        let kind_spec = definitions.kind(kind);
        let name = target.layer_name(kind_spec, php);
        let inputs_key = stage::layer_key(&stage::LayerInputs {
            layers_dir: &project.join("layers"),
            runtime_dir: &project.join("runtime"),
            runtime_files: &definitions.runtime_files(kind),
            build_name: &stage::identity(&build.dir)?,
            root_name: &stage::identity(&root.path)?,
            kind: kind.name(),
            arch: arch.lambda_name(),
        })?;
        if !plan.forced(Stage::Layers) {
            if let Some(kept) = unchanged_layer(previous, &name, &inputs_key, &plan.out_dir) {
                eprintln!("layer {name}: cached (inputs unchanged, {})", kept.zip);
                built.layers.push(kept);
                continue;
            }
        }
        let started = Instant::now();
        let contents = layer::assemble(definitions, kind, target, &build, root, project)
            .with_context(|| format!("failed to assemble the layer {name}"))?;
        let zip_path = plan.out_dir.join(format!("{name}.zip"));
        let summary = write_layer(&name, &contents.entries, &zip_path)?;
        eprintln!(
            "layer {name}: {} libraries, zipped to {:.1} MB in {:.1} s",
            contents.libraries.len(),
            summary.size as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );

        let disabled_extensions = definitions
            .extensions
            .shared()
            .filter(|extension| extension.mode == crate::matrix::ExtensionMode::SharedOff)
            .map(|extension| (extension.name.clone(), extension.file.clone().unwrap_or_default()))
            .collect();
        built.layers.push(ManifestLayer {
            name: name.clone(),
            kind,
            architecture: arch,
            php_version: release.version.clone(),
            description: kind_spec.description.replace("{version}", &release.version),
            compatible_runtimes: vec![COMPATIBLE_RUNTIME.to_string()],
            compatible_architectures: vec![target.lambda_architecture.clone()],
            glibc_max: target.glibc_max.to_string(),
            ld_library_path: target.ld_library_path.clone(),
            loader: target.loader.clone(),
            zip: format!("{name}.zip"),
            sha256: summary.sha256,
            code_sha256: summary.code_sha256,
            zip_bytes: summary.size,
            unzipped_bytes: summary.unzipped_size,
            modules: definitions.extensions.expected_modules(&[]).into(),
            disabled_extensions,
            libraries: contents.libraries.into_iter().map(LibraryRecord::from).collect(),
            inputs_key,
            acceptance: None,
        });
    }
    Ok(())
}

/// Returns the entry of the layer `name` from the previous manifest when it
/// was built from the same inputs and its zip is still the one recorded.
fn unchanged_layer(previous: &Manifest, name: &str, inputs_key: &str, out_dir: &Path) -> Option<ManifestLayer> {
    let entry = previous.layers.iter().find(|layer| layer.name == name)?;
    if entry.inputs_key != inputs_key {
        return None;
    }
    let zip = out_dir.join(&entry.zip);
    let size = fs::metadata(&zip).ok()?.len();
    if size != entry.zip_bytes || sources::sha256_file(&zip).ok()? != entry.sha256 {
        return None;
    }
    Some(entry.clone())
}

/// Returns how to compile for `target`. A cross compile needs the native
/// build of the same release, whose php_config.h it is checked against.
/// It takes that build from this run when it was made earlier, and
/// otherwise makes it (or takes it from the cache) first.
fn toolchain<'a>(
    context: &CellContext<'a>,
    target: &'a Target,
    release: &PhpRelease,
    tarball: &Path,
    jobs: usize,
) -> Result<Toolchain<'a>> {
    let CellContext { definitions, host, .. } = *context;
    if !target.is_cross(host) {
        return Ok(Toolchain { target, cross: None });
    }

    let spec = target
        .cross
        .as_ref()
        .with_context(|| format!("no [cross] section for {}", target.arch))?;
    let native_target = definitions.target(host);
    let earlier = context
        .compiled
        .iter()
        .find(|cell| cell.arch == host && cell.release == release.minor);
    let native_build = match earlier {
        Some(cell) => cell.build.clone(),
        None => compile_native(context, native_target, release, tarball, jobs)?,
    };
    Ok(Toolchain {
        target,
        cross: Some(Cross {
            spec,
            build_triplet: &native_target.gnu_triplet,
            native_header: native_build.php_config_h(),
        }),
    })
}

/// Compiles PHP for the build machine (or takes it from the cache), for a
/// cross compile of a run that did not select the build machine's
/// architecture.
fn compile_native(
    context: &CellContext,
    native_target: &Target,
    release: &PhpRelease,
    tarball: &Path,
    jobs: usize,
) -> Result<compile::PhpBuild> {
    let CellContext {
        definitions,
        plan,
        mirrors,
        host,
        arch,
        ..
    } = *context;
    eprintln!(
        "compile php-{} ({arch}): the php_config.h check needs the {host} build, which comes first",
        release.version
    );
    let native_recipe = RootRecipe::new(&definitions.build_root, native_target, host)?;
    let native_root = build_root::ensure(&native_recipe, mirrors, &plan.cache_dir)
        .with_context(|| format!("failed to prepare the {host} build root"))?;
    let native_toolchain = Toolchain {
        target: native_target,
        cross: None,
    };
    compile::compile(
        definitions,
        release,
        tarball,
        &native_root,
        &native_toolchain,
        &compile::CompileOptions {
            cache_dir: &plan.cache_dir,
            jobs,
            // NOTE: `--force php` with `--arch arm64` alone does not rebuild
            // this build (documented in `--help`).
            force: false,
        },
    )
    .with_context(|| format!("failed to compile PHP {} for {host}", release.version))
}

fn plan(args: &BuildLayersArgs, definitions: &Definitions, project: &Path) -> Result<Plan> {
    let php = if args.php.is_empty() {
        let defaults = definitions.default_releases();
        if defaults.is_empty() {
            bail!("no release under layers/php/ sets build_by_default: name one with --php");
        }
        defaults
    } else {
        for version in &args.php {
            if !definitions.php.contains_key(version) {
                let declared: Vec<String> = definitions.php.keys().map(ToString::to_string).collect();
                bail!(
                    "PHP {version} is not declared under layers/php/ (declared: {}); add layers/php/{version}.toml to build it",
                    declared.join(", ")
                );
            }
        }
        args.php.clone()
    };

    let arches = if args.arch.is_empty() {
        Arch::ALL.to_vec()
    } else {
        args.arch.clone()
    };
    for arch in &arches {
        if !definitions.targets.contains_key(arch) {
            bail!("no target definition layers/targets/al2023-{arch}.toml");
        }
    }

    let kinds = if args.layer.is_empty() {
        LayerKind::ALL.to_vec()
    } else {
        args.layer.clone()
    };

    if let (Some(force), Some(until)) = (args.force, args.until) {
        if force > until {
            bail!("--force {force} names a stage after --until {until}, which never runs: drop one of them");
        }
    }

    let out_dir = args.common.out_dir(project);
    let cache_dir = args.common.cache_dir(project);
    for dir in [&out_dir, &cache_dir] {
        fs::create_dir_all(dir).with_context(|| format!("failed to create the directory {}", dir.display()))?;
    }

    Ok(Plan {
        php: dedup(php),
        arches: dedup(arches),
        kinds: dedup(kinds),
        out_dir,
        cache_dir,
        jobs: args.common.jobs(),
        use_urls: !args.common.no_release_urls,
        until: args.until,
        force: args.force,
        tarballs: BTreeMap::new(),
    })
}

fn dedup<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items.dedup();
    items
}

/// Checks the size limits and writes the zip.
fn write_layer(name: &str, entries: &[Entry], zip_path: &Path) -> Result<ZipSummary> {
    let mut unzipped: u64 = 0;
    for entry in entries {
        if let EntrySource::File(source) = &entry.source {
            unzipped += fs::metadata(source)
                .with_context(|| format!("failed to read {}", source.display()))?
                .len();
        }
    }
    if unzipped > MAX_UNZIPPED_BYTES {
        bail!(
            "layer {name} would be {unzipped} bytes unzipped, over Lambda's limit of {MAX_UNZIPPED_BYTES} bytes \
             for a function and all its layers; remove extensions or libraries"
        );
    }

    let summary = archive::write_zip(entries, zip_path)?;
    if summary.size > MAX_INLINE_ZIP_BYTES {
        eprintln!(
            "warning: {} is {} bytes, over the {MAX_INLINE_ZIP_BYTES} bytes PublishLayerVersion accepts inline; \
             publishing it needs an S3 bucket in each region",
            zip_path.display(),
            summary.size
        );
    }
    Ok(summary)
}

/// Writes manifest.json, keeping the entries of layers this run did not
/// build as long as their zip is still there. A rebuilt zip identical to
/// the one before keeps its acceptance record.
fn write_manifest(out_dir: &Path, built: &[ManifestLayer]) -> Result<()> {
    let mut manifest = read_manifest(out_dir);
    let mut built = built.to_vec();
    for new in &mut built {
        let passed = manifest
            .layers
            .iter()
            .find(|old| old.name == new.name)
            // The tests also read the manifest entry (modules, libraries,
            // loader), so the inputs must be the same too.
            .filter(|old| old.inputs_key == new.inputs_key)
            .and_then(|old| old.acceptance.clone())
            .filter(|acceptance| acceptance.zip_sha256 == new.sha256);
        new.acceptance = passed;
    }
    manifest
        .layers
        .retain(|old| !built.iter().any(|new| new.name == old.name) && out_dir.join(&old.zip).exists());
    manifest.layers.extend(built);
    manifest.layers.sort_by(|a, b| a.name.cmp(&b.name));
    save_manifest(out_dir, &manifest)
}

/// Reads manifest.json, or an empty manifest when there is none or it
/// cannot be read (with a warning).
fn read_manifest(out_dir: &Path) -> Manifest {
    let path = out_dir.join(MANIFEST_NAME);
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|error| {
            eprintln!("warning: ignoring the unreadable {}: {error}", path.display());
            Manifest::default()
        }),
        Err(_) => Manifest::default(),
    }
}

fn save_manifest(out_dir: &Path, manifest: &Manifest) -> Result<()> {
    let path = out_dir.join(MANIFEST_NAME);
    let text = serde_json::to_string_pretty(manifest)? + "\n";
    let temporary = archive::partial_file_in(out_dir)?;
    fs::write(temporary.path(), text)?;
    archive::make_world_readable(temporary.path())?;
    temporary
        .persist(&path)
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

/// Records that the acceptance tests passed on every zip of the manifest
/// whose content is still the one listed (`zip_hashes`: name → sha256 hex
/// of the zip when the tests started).
pub fn record_acceptance(out_dir: &Path, zip_hashes: &BTreeMap<String, String>) -> Result<usize> {
    let mut manifest = read_manifest(out_dir);
    let passed_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut recorded = 0;
    for layer in &mut manifest.layers {
        if zip_hashes.get(&layer.name) == Some(&layer.sha256) {
            layer.acceptance = Some(Acceptance {
                zip_sha256: layer.sha256.clone(),
                passed_at: passed_at.clone(),
            });
            recorded += 1;
        }
    }
    save_manifest(out_dir, &manifest)?;
    Ok(recorded)
}

/// Prints the table of the layers on stdout, the task's result, and where
/// they are on stderr with the progress lines.
fn print_summary(built: &[ManifestLayer], out_dir: &Path) {
    println!(
        "{:<22} {:>8} {:>12} {:>14} {:>10}",
        "layer", "arch", "zip bytes", "unzipped bytes", "libraries"
    );
    for layer in built {
        println!(
            "{:<22} {:>8} {:>12} {:>14} {:>10}",
            layer.name,
            layer.architecture,
            layer.zip_bytes,
            layer.unzipped_bytes,
            layer.libraries.len()
        );
    }
    eprintln!("zips and {MANIFEST_NAME} in {}", out_dir.display());
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> BuildLayersArgs {
        let mut argv = vec!["cargo xtask", "build-layers"];
        argv.extend_from_slice(args);
        match crate::flags::Xtask::parse_from(argv).task {
            crate::flags::Task::BuildLayers(args) => args,
            _ => unreachable!(),
        }
    }

    fn plan_for(args: &[&str]) -> Result<Plan> {
        let project = project_root();
        let definitions = Definitions::load(&project.join("layers")).unwrap();
        plan(&parse(args), &definitions, &project)
    }

    #[test]
    fn default_plan_covers_everything_supported() {
        let plan = plan_for(&[]).unwrap();
        assert_eq!(plan.arches, [Arch::X86_64, Arch::Arm64]);
        assert_eq!(plan.kinds, [LayerKind::Function, LayerKind::Fpm]);
        assert!(plan.php.contains(&"8.2".parse().unwrap()));
        assert!(plan.out_dir.ends_with("dist"));
    }

    #[test]
    fn matrix_expands_declared_releases() {
        let default = plan_for(&[]).unwrap();
        assert_eq!(
            default.php,
            ["8.2".parse().unwrap()],
            "8.3 and 8.4 are built only when named"
        );

        let plan = plan_for(&["--php", "8.4", "--php", "8.3", "--php", "8.4"]).unwrap();
        assert_eq!(plan.php, ["8.3".parse().unwrap(), "8.4".parse().unwrap()]);
        let definitions = Definitions::load(&project_root().join("layers")).unwrap();
        let mut names = Vec::new();
        for php in &plan.php {
            for arch in &plan.arches {
                for kind in &plan.kinds {
                    names.push(definitions.target(*arch).layer_name(definitions.kind(*kind), *php));
                }
            }
        }
        assert_eq!(
            names,
            [
                "php-83",
                "php-83-fpm",
                "arm-php-83",
                "arm-php-83-fpm",
                "php-84",
                "php-84-fpm",
                "arm-php-84",
                "arm-php-84-fpm"
            ]
        );
    }

    #[test]
    fn missing_source_names_the_sources_directory() {
        let definitions = Definitions::load(&project_root().join("layers")).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let mirrors = Mirrors::discover(Some("http://127.0.0.1:9/debian")).unwrap();
        let release = &definitions.php[&"8.4".parse().unwrap()];
        let error = format!(
            "{:#}",
            sources::fetch(release, &mirrors, cache.path(), false).unwrap_err()
        );
        let directory = cache.path().join("sources");
        assert!(error.contains(&format!("php-{}.tar.xz", release.version)), "{error}");
        assert!(error.contains(&release.sha256), "{error}");
        assert!(error.contains(&directory.display().to_string()), "{error}");
        assert!(error.contains("skipped (--no-release-urls)"), "{error}");
    }

    #[test]
    fn kept_layer_needs_same_key_and_zip() {
        let out_dir = tempfile::tempdir().unwrap();
        let zip = out_dir.path().join("php-82.zip");
        fs::write(&zip, b"zip bytes").unwrap();
        let mut entry: ManifestLayer = serde_json::from_value(serde_json::json!({
            "name": "php-82", "kind": "function", "architecture": "x86_64", "php_version": "8.2.32",
            "description": "", "compatible_runtimes": [], "compatible_architectures": [], "glibc_max": "2.34",
            "ld_library_path": "", "loader": "", "zip": "php-82.zip", "code_sha256": "",
            "sha256": sources::sha256_file(&zip).unwrap(), "zip_bytes": 9, "unzipped_bytes": 9,
            "modules": {"php": [], "zend": []}, "disabled_extensions": {}, "libraries": [],
        }))
        .unwrap();
        entry.inputs_key = "k1".to_string();
        let previous = Manifest { layers: vec![entry] };

        assert!(unchanged_layer(&previous, "php-82", "k1", out_dir.path()).is_some());
        assert!(
            unchanged_layer(&previous, "php-82", "k2", out_dir.path()).is_none(),
            "another key"
        );
        assert!(
            unchanged_layer(&previous, "php-83", "k1", out_dir.path()).is_none(),
            "another layer"
        );
        // A zip replaced by an interrupted or other build is not reused.
        fs::write(&zip, b"zip byteZ").unwrap();
        assert!(
            unchanged_layer(&previous, "php-82", "k1", out_dir.path()).is_none(),
            "changed zip"
        );
        fs::remove_file(&zip).unwrap();
        assert!(
            unchanged_layer(&previous, "php-82", "k1", out_dir.path()).is_none(),
            "missing zip"
        );
    }

    #[test]
    fn cells_share_the_jobs() {
        assert_eq!(cell_slots(1, 2), (1, 2), "one version gets every job");
        assert_eq!(cell_slots(3, 2), (2, 1), "no more cells than jobs");
        assert_eq!(cell_slots(3, 8), (3, 2));
        assert_eq!(cell_slots(2, 1), (1, 1));
        assert_eq!(cell_slots(0, 4), (1, 4));
    }

    #[test]
    fn force_after_until_is_rejected() {
        let error = plan_for(&["--force", "layers", "--until", "php"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("never runs"), "{error}");
        assert!(error.contains("--force layers"), "{error}");
        assert!(error.contains("--until php"), "{error}");
        plan_for(&["--force", "php", "--until", "php"]).unwrap();
    }

    #[test]
    fn arch_flag_selects_arm64() {
        let plan = plan_for(&["--arch", "arm64"]).unwrap();
        assert_eq!(plan.arches, [Arch::Arm64]);
    }

    #[test]
    fn undeclared_php_version_is_rejected() {
        let error = plan_for(&["--php", "7.4"]).err().unwrap().to_string();
        assert!(error.contains("PHP 7.4 is not declared"), "{error}");
        assert!(error.contains("8.2"), "{error}");
    }

    #[test]
    fn layer_flag_selects_kind() {
        let plan = plan_for(&["--layer", "fpm", "--layer", "fpm"]).unwrap();
        assert_eq!(plan.kinds, [LayerKind::Fpm]);
    }

    #[test]
    fn oversized_layer_is_rejected_before_zipping() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        fs::File::create(&big).unwrap().set_len(MAX_UNZIPPED_BYTES + 1).unwrap();
        let entries = vec![Entry {
            path: "bin/php".into(),
            source: EntrySource::File(big),
            mode: 0o755,
        }];
        let zip_path = dir.path().join("php-82.zip");

        let error = write_layer("php-82", &entries, &zip_path).unwrap_err().to_string();

        assert!(error.contains("over Lambda's limit"), "{error}");
        assert!(!zip_path.exists());
    }
}
