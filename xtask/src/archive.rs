//! Deterministic layer zips: the same entries always give the same bytes.
//!
//! Entries are written in sorted order with a fixed timestamp and explicit
//! unix modes; symlinks are stored as symlinks. Nothing from the host (file
//! times, owners, umask, directory walk order) reaches the archive. Files
//! are compressed in parallel, then written in order.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use zip::write::{PreparedZipFile, SimpleFileOptions, ZipFileBuilder};
use zip::{CompressionMethod, DateTime, ZipWriter};

/// Content of an archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntrySource {
    /// The contents of a host file (symlinks followed).
    File(PathBuf),
    /// A symlink to this target, relative to the entry's directory.
    Symlink(String),
    Directory,
}

/// One entry of a layer zip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, relative to `/opt`, without a leading slash
    /// and (for directories too) without a trailing one.
    pub path: String,
    pub source: EntrySource,
    /// Unix permission bits, such as 0o755.
    pub mode: u32,
}

/// Digests and sizes of a written zip.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ZipSummary {
    /// Hex sha256 of the zip file.
    pub sha256: String,
    /// Base64 sha256 of the zip file, as Lambda reports `CodeSha256`.
    pub code_sha256: String,
    /// Size of the zip file in bytes.
    pub size: u64,
    /// Total size of the files once unzipped, in bytes.
    pub unzipped_size: u64,
}

/// Deflate level: the smallest output, as the layers are uploaded many times.
const COMPRESSION_LEVEL: i64 = 9;

/// Start of the names of the files written before they are renamed into
/// place. A run that is killed leaves its file under such a name, never
/// under the final one, and [`remove_partial_files`] removes it later.
pub const PARTIAL_PREFIX: &str = ".partial-";

/// Creates a temporary file named with [`PARTIAL_PREFIX`] in `dir`.
pub fn partial_file_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new().prefix(PARTIAL_PREFIX).tempfile_in(dir)
}

/// Removes the files that killed runs left in `dir` (named with
/// [`PARTIAL_PREFIX`]) and returns how many there were.
pub fn remove_partial_files(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) && entry.file_type()?.is_file() {
            fs::remove_file(entry.path()).with_context(|| format!("failed to remove {}", entry.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Writes `entries` to the zip at `path`, atomically: a failure leaves no
/// partial file at `path`.
pub fn write_zip(entries: &[Entry], path: &Path) -> Result<ZipSummary> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for pair in sorted.windows(2) {
        if pair[0].path == pair[1].path {
            bail!("two layer entries have the same path {}", pair[0].path);
        }
    }

    let dir = path.parent().context("zip path has no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let temporary = partial_file_in(dir)?;
    let mut writer = ZipWriter::new(BufWriter::new(temporary.reopen()?));
    let base = SimpleFileOptions::default()
        .last_modified_time(DateTime::default())
        .large_file(false);

    // Deflate at level 9 is the slow part: every file is compressed on the
    // rayon pool, then the archive is written in entry order.
    let compressed: Vec<Option<(PreparedZipFile, u64)>> = sorted
        .par_iter()
        .map(|entry| -> Result<Option<(PreparedZipFile, u64)>> {
            let EntrySource::File(source) = &entry.source else {
                return Ok(None);
            };
            let options = base
                .unix_permissions(entry.mode)
                .compression_method(CompressionMethod::Deflated)
                .compression_level(Some(COMPRESSION_LEVEL));
            let mut file = File::open(source)
                .with_context(|| format!("failed to open {} for {}", source.display(), entry.path))?;
            let mut builder = ZipFileBuilder::new(entry.path.as_str(), options)?;
            let size = io::copy(&mut file, &mut builder)
                .with_context(|| format!("failed to compress {}", source.display()))?;
            Ok(Some((builder.finish()?, size)))
        })
        .collect::<Result<_>>()?;

    let mut unzipped_size = 0;
    for (entry, prepared) in sorted.iter().zip(compressed) {
        let options = base.unix_permissions(entry.mode);
        match (&entry.source, prepared) {
            (EntrySource::Directory, _) => {
                writer.add_directory(format!("{}/", entry.path), options)?;
            }
            (EntrySource::Symlink(target), _) => {
                writer.add_symlink(entry.path.as_str(), target.as_str(), options)?;
            }
            (EntrySource::File(_), Some((prepared, size))) => {
                writer.add_prepared_file(prepared)?;
                unzipped_size += size;
            }
            (EntrySource::File(source), None) => bail!("{} was not compressed", source.display()),
        }
    }
    writer.finish()?.flush()?;

    let bytes_digest = {
        let mut file = File::open(temporary.path())?;
        let mut hasher = Sha256::new();
        io::copy(&mut file, &mut hasher)?;
        hasher.finalize()
    };
    let size = temporary.as_file().metadata()?.len();
    make_world_readable(temporary.path())?;
    temporary
        .persist(path)
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(ZipSummary {
        sha256: crate::sources::hex(&bytes_digest),
        code_sha256: base64::engine::general_purpose::STANDARD.encode(bytes_digest),
        size,
        unzipped_size,
    })
}

/// Gives a file mode 0644: temporary files start as 0600, and the outputs
/// are read by upload steps and other users.
pub fn make_world_readable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("failed to set the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    fn sample_entries(dir: &Path) -> Vec<Entry> {
        let php = dir.join("php");
        fs::write(&php, b"\x7fELF pretend binary").unwrap();
        let library = dir.join("libfoo.so.1.2.3");
        fs::write(&library, vec![b'x'; 10_000]).unwrap();
        vec![
            Entry {
                path: "lib/libfoo.so.1".into(),
                source: EntrySource::Symlink("libfoo.so.1.2.3".into()),
                mode: 0o777,
            },
            Entry {
                path: "bin/php".into(),
                source: EntrySource::File(php),
                mode: 0o755,
            },
            Entry {
                path: "lib".into(),
                source: EntrySource::Directory,
                mode: 0o755,
            },
            Entry {
                path: "lib/libfoo.so.1.2.3".into(),
                source: EntrySource::File(library),
                mode: 0o644,
            },
        ]
    }

    #[test]
    fn partial_files_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let kept_partial = partial_file_in(dir.path()).unwrap().into_temp_path().keep().unwrap();
        fs::write(dir.path().join("php-82.zip"), b"zip").unwrap();
        fs::write(dir.path().join("partial-notes.txt"), b"notes").unwrap();
        fs::create_dir(dir.path().join(".partial-directory")).unwrap();

        let removed = remove_partial_files(dir.path()).unwrap();

        assert_eq!(removed, 1);
        assert!(!kept_partial.exists());
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".partial-directory", "partial-notes.txt", "php-82.zip"]);
    }

    #[test]
    fn same_entries_give_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let entries = sample_entries(dir.path());

        let first = write_zip(&entries, &dir.path().join("one.zip")).unwrap();
        // Touch the sources and reverse the input order: neither may matter.
        for entry in &entries {
            if let EntrySource::File(path) = &entry.source {
                fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        let reversed: Vec<Entry> = entries.iter().rev().cloned().collect();
        let second = write_zip(&reversed, &dir.path().join("two.zip")).unwrap();

        assert_eq!(first, second);
        assert_eq!(
            fs::read(dir.path().join("one.zip")).unwrap(),
            fs::read(dir.path().join("two.zip")).unwrap()
        );
    }

    #[test]
    fn entries_are_sorted_with_modes_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer.zip");
        let summary = write_zip(&sample_entries(dir.path()), &path).unwrap();
        assert_eq!(summary.unzipped_size, 10_000 + 19);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);

        let mut archive = zip::ZipArchive::new(File::open(&path).unwrap()).unwrap();
        let mut in_order = Vec::new();
        for index in 0..archive.len() {
            in_order.push(archive.by_index(index).unwrap().name().unwrap().to_string());
        }
        assert_eq!(in_order, ["bin/php", "lib/", "lib/libfoo.so.1", "lib/libfoo.so.1.2.3"]);

        let php = archive.by_name("bin/php").unwrap();
        assert_eq!(php.unix_mode().unwrap() & 0o7777, 0o755);
        assert_eq!(php.last_modified(), Some(DateTime::default()));
        drop(php);

        let mut link = archive.by_name("lib/libfoo.so.1").unwrap();
        assert!(link.is_symlink());
        let mut target = String::new();
        link.read_to_string(&mut target).unwrap();
        assert_eq!(target, "libfoo.so.1.2.3");
    }

    #[test]
    fn duplicate_paths_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = sample_entries(dir.path());
        entries.push(entries[1].clone());
        let path = dir.path().join("layer.zip");

        let error = write_zip(&entries, &path).unwrap_err().to_string();

        assert!(error.contains("bin/php"), "{error}");
        assert!(!path.exists());
    }

    #[test]
    fn digests_match_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer.zip");
        let summary = write_zip(&sample_entries(dir.path()), &path).unwrap();

        let bytes = fs::read(&path).unwrap();
        assert_eq!(summary.size, bytes.len() as u64);
        assert_eq!(summary.sha256, crate::sources::hex(&Sha256::digest(&bytes)));
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&summary.code_sha256)
            .unwrap();
        assert_eq!(decoded, Sha256::digest(&bytes).to_vec());
    }
}
