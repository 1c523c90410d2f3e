//! The library search of one DT_NEEDED name: expansion of DT_RPATH and
//! DT_RUNPATH into directories, the search order, and the lookup of the name
//! in those directories inside the sysroot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::sysroot::{host_path, real_inner_path, real_path_in_dir, SysrootPathError};
use super::Problem;

/// A library file found for a DT_NEEDED name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Host path of the file under the name, in the real directory.
    pub path: PathBuf,
    /// Inner path of the same, the base of the library's own $ORIGIN.
    pub inner_path: PathBuf,
    /// Host path after following every symlink inside the sysroot.
    pub real_path: PathBuf,
}

/// Result of looking up one DT_NEEDED name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupResult {
    /// The first file of the search path with that name.
    Found(Found),
    /// No directory of the search path has the name. `searched` lists them.
    NotFound { searched: Vec<PathBuf> },
    /// The lookup failed on a path, for example a symlink loop.
    Failed(Problem),
}

/// Expands the DT_RPATH or DT_RUNPATH strings `values` of the object `file`
/// into inner directories, in order.
///
/// `origin` is the inner directory of the object, which replaces `$ORIGIN`
/// and `${ORIGIN}`. An entry that uses `$LIB` or `$PLATFORM`, or that is not
/// absolute after expansion, yields a problem instead of a directory.
pub fn expand_search_path(values: &[String], origin: &Path, tag: &str, file: &Path) -> (Vec<PathBuf>, Vec<Problem>) {
    let mut dirs = Vec::new();
    let mut problems = Vec::new();

    for value in values {
        // NOTE: ld.so reads an empty entry as the working directory of the
        // process. It is skipped here because it has no meaning in the sysroot.
        for entry in value.split(':').filter(|entry| !entry.is_empty()) {
            let problem = |reason: String| Problem::UnsupportedSearchPath {
                file: file.to_owned(),
                tag: tag.to_owned(),
                entry: entry.to_owned(),
                reason,
            };

            match substitute_tokens(entry, origin) {
                Ok(expanded) if expanded.starts_with('/') => dirs.push(PathBuf::from(expanded)),
                Ok(_) => problems.push(problem(
                    "a relative directory is taken from the working directory of the process".to_owned(),
                )),
                Err(reason) => problems.push(problem(reason)),
            }
        }
    }

    (dirs, problems)
}

/// Replaces the dynamic string tokens `$ORIGIN` and `${ORIGIN}` in `entry`
/// with `origin`.
///
/// `$LIB` and `$PLATFORM` depend on the target's loader and return an error.
/// Any other `$NAME` stays as written, as ld.so keeps an unknown token.
fn substitute_tokens(entry: &str, origin: &Path) -> Result<String, String> {
    let origin = origin.to_string_lossy();
    let mut expanded = String::with_capacity(entry.len());
    let mut rest = entry;

    while let Some(dollar) = rest.find('$') {
        expanded.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];

        let (name, token_length) = match after.strip_prefix('{') {
            Some(braced) => match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => return Err("the ${ has no closing }".to_owned()),
            },
            None => {
                let length = after
                    .bytes()
                    .take_while(|byte| byte.is_ascii_alphanumeric() || *byte == b'_')
                    .count();
                (&after[..length], length)
            }
        };

        match name {
            "ORIGIN" => expanded.push_str(&origin),
            "LIB" | "PLATFORM" => {
                return Err(format!(
                    "${name} depends on the target's loader, which the closure does not run"
                ))
            }
            _ => {
                expanded.push('$');
                expanded.push_str(&after[..token_length]);
            }
        }
        rest = &after[token_length..];
    }

    expanded.push_str(rest);
    Ok(expanded)
}

/// Returns the directories searched for the DT_NEEDED names of one object,
/// in ld.so's order, without repeats.
///
/// `own_rpath` and `loader_rpath` (the DT_RPATH directories of the loaders,
/// nearest first) apply only when the object has no DT_RUNPATH. Then come
/// `runpath` and the target's `search_dirs`.
pub fn search_order(
    own_rpath: &[PathBuf],
    loader_rpath: &[PathBuf],
    runpath: &[PathBuf],
    has_runpath: bool,
    search_dirs: &[PathBuf],
) -> Vec<PathBuf> {
    let mut order: Vec<PathBuf> = Vec::new();
    let mut add = |dirs: &[PathBuf]| {
        for dir in dirs {
            if !order.contains(dir) {
                order.push(dir.clone());
            }
        }
    };

    if !has_runpath {
        add(own_rpath);
        add(loader_rpath);
    }
    add(runpath);
    add(search_dirs);

    order
}

/// A path resolved inside the sysroot: its real inner path, None when it
/// does not exist, or why it cannot be resolved.
type Resolution = Result<Option<PathBuf>, SysrootPathError>;

/// The lookups of one walk, made once each and shared by its threads.
///
/// Most objects search the same directories for the same names, and the
/// sysroot does not change while the closure is resolved.
#[derive(Default)]
pub struct SearchCache {
    /// Real inner path of each inner directory searched.
    real_dirs: Mutex<HashMap<PathBuf, Resolution>>,
    /// By real directory, then by name: the real inner path of the regular
    /// file under that name.
    files: Mutex<HashMap<PathBuf, HashMap<String, Resolution>>>,
}

impl SearchCache {
    /// Returns the real inner path of the inner directory `dir`.
    fn real_dir(&self, sysroot: &Path, dir: &Path) -> Resolution {
        if let Some(real_dir) = lock(&self.real_dirs).get(dir) {
            return real_dir.clone();
        }
        // Two threads may resolve the same directory at once: both get the
        // same result.
        let real_dir = real_inner_path(sysroot, dir);
        lock(&self.real_dirs).insert(dir.to_owned(), real_dir.clone());
        real_dir
    }

    /// Returns the real inner path of `inner`, as [`real_inner_path`] does,
    /// with its directory resolved once per walk: the roots share a few.
    pub fn real_path(&self, sysroot: &Path, inner: &Path) -> Resolution {
        let (Some(dir), Some(name)) = (inner.parent(), inner.file_name().and_then(|name| name.to_str())) else {
            return real_inner_path(sysroot, inner);
        };
        let Some(real_dir) = self.real_dir(sysroot, dir)? else {
            return Ok(None);
        };
        let real = real_path_in_dir(sysroot, &real_dir, name)?;
        Ok(real.map(|real| real.inner_path))
    }

    /// Returns the real inner path of the regular file `name` in `real_dir`,
    /// or None when no regular file has that name.
    fn real_file(&self, sysroot: &Path, real_dir: &Path, name: &str) -> Resolution {
        if let Some(real_file) = lock(&self.files).get(real_dir).and_then(|names| names.get(name)) {
            return real_file.clone();
        }
        let real_file = real_path_in_dir(sysroot, real_dir, name)
            .map(|real| real.filter(|real| real.is_file).map(|real| real.inner_path));
        lock(&self.files)
            .entry(real_dir.to_owned())
            .or_default()
            .insert(name.to_owned(), real_file.clone());
        real_file
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().expect("a lookup thread panicked")
}

/// Looks up the DT_NEEDED `name` of `needed_by` in `dirs`, inside the sysroot.
///
/// The first directory whose entry `name` exists wins, as in ld.so, even if
/// the file turns out to be for another machine: the caller checks it. A
/// name with a slash is a path and is not searched.
pub fn find_library(
    sysroot: &Path,
    cache: &SearchCache,
    name: &str,
    dirs: &[PathBuf],
    needed_by: &Path,
) -> LookupResult {
    if name.contains('/') {
        let path = Path::new(name);
        if !path.is_absolute() {
            return LookupResult::NotFound { searched: Vec::new() };
        }
        let (Some(parent), Some(file_name)) = (path.parent(), path.file_name()) else {
            return LookupResult::NotFound { searched: Vec::new() };
        };
        return match find_in_dir(sysroot, cache, parent, file_name.to_string_lossy().as_ref(), needed_by) {
            Ok(Some(found)) => LookupResult::Found(found),
            Ok(None) => LookupResult::NotFound {
                searched: vec![parent.to_owned()],
            },
            Err(problem) => LookupResult::Failed(problem),
        };
    }

    for dir in dirs {
        match find_in_dir(sysroot, cache, dir, name, needed_by) {
            Ok(Some(found)) => return LookupResult::Found(found),
            Ok(None) => continue,
            Err(problem) => return LookupResult::Failed(problem),
        }
    }

    LookupResult::NotFound {
        searched: dirs.to_vec(),
    }
}

/// Returns the regular file `name` in the inner directory `dir`, or None when
/// the directory or the file does not exist or the file is not a regular file.
fn find_in_dir(
    sysroot: &Path,
    cache: &SearchCache,
    dir: &Path,
    name: &str,
    needed_by: &Path,
) -> Result<Option<Found>, Problem> {
    let bad_path = |path: PathBuf, error: SysrootPathError| Problem::BadPath {
        needed_by: Some(needed_by.to_owned()),
        soname: Some(name.to_owned()),
        path,
        sysroot: sysroot.to_owned(),
        reason: error.to_string(),
    };

    let real_dir = match cache.real_dir(sysroot, dir) {
        Ok(Some(real_dir)) => real_dir,
        Ok(None) => return Ok(None),
        Err(error) => return Err(bad_path(dir.to_owned(), error)),
    };

    // ld.so cannot map a directory or a device, so it goes on to the next one.
    let real_inner = match cache.real_file(sysroot, &real_dir, name) {
        Ok(Some(real_inner)) => real_inner,
        Ok(None) => return Ok(None),
        Err(error) => return Err(bad_path(dir.join(name), error)),
    };

    let inner_path = real_dir.join(name);
    Ok(Some(Found {
        path: host_path(sysroot, &inner_path),
        inner_path,
        real_path: host_path(sysroot, &real_inner),
    }))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::closure::fixtures::Sysroot;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|value| (*value).to_owned()).collect()
    }

    fn paths(values: &[&str]) -> Vec<PathBuf> {
        values.iter().map(PathBuf::from).collect()
    }

    /// Looks up `name` for /php in `dirs` with a new cache.
    fn find(sysroot: &Sysroot, name: &str, dirs: &[PathBuf]) -> LookupResult {
        find_library(sysroot.path(), &SearchCache::default(), name, dirs, Path::new("/php"))
    }

    #[test]
    fn expand_replaces_origin_forms() {
        let (dirs, problems) = expand_search_path(
            &strings(&["$ORIGIN/../lib:${ORIGIN}/ext", "/opt/lib"]),
            Path::new("/build/stage/bin"),
            "DT_RPATH",
            Path::new("/sysroot/build/stage/bin/php"),
        );

        assert_eq!(problems, Vec::new());
        assert_eq!(
            dirs,
            paths(&["/build/stage/bin/../lib", "/build/stage/bin/ext", "/opt/lib"])
        );
    }

    #[test]
    fn expand_rejects_lib_and_platform_tokens() {
        let (dirs, problems) = expand_search_path(
            &strings(&["/usr/$LIB:/opt/${PLATFORM}/lib:/opt/lib"]),
            Path::new("/bin"),
            "DT_RPATH",
            Path::new("/sysroot/bin/php"),
        );

        assert_eq!(dirs, paths(&["/opt/lib"]));
        assert_eq!(problems.len(), 2, "problems: {problems:?}");
        let message = problems[0].to_string();
        assert!(message.contains("$LIB"), "message: {message}");
        assert!(message.contains("\"/usr/$LIB\""), "message: {message}");
        assert!(problems[1].to_string().contains("$PLATFORM"));
    }

    #[test]
    fn expand_rejects_relative_directory() {
        let (dirs, problems) = expand_search_path(
            &strings(&["lib"]),
            Path::new("/bin"),
            "DT_RUNPATH",
            Path::new("/sysroot/bin/php"),
        );

        assert_eq!(dirs, Vec::<PathBuf>::new());
        assert_eq!(problems.len(), 1, "problems: {problems:?}");
        assert!(problems[0].to_string().contains("DT_RUNPATH entry \"lib\""));
    }

    #[test]
    fn expand_keeps_unknown_token() {
        let (dirs, problems) = expand_search_path(
            &strings(&["/opt/$HOME/lib"]),
            Path::new("/bin"),
            "DT_RPATH",
            Path::new("/sysroot/bin/php"),
        );

        assert_eq!(problems, Vec::new());
        assert_eq!(dirs, paths(&["/opt/$HOME/lib"]));
    }

    #[test]
    fn search_order_puts_rpath_chain_first() {
        let order = search_order(
            &paths(&["/own"]),
            &paths(&["/loader", "/usr/lib"]),
            &[],
            false,
            &paths(&["/lib", "/usr/lib"]),
        );

        assert_eq!(order, paths(&["/own", "/loader", "/usr/lib", "/lib"]));
    }

    #[test]
    fn search_order_skips_rpath_when_runpath_exists() {
        let order = search_order(
            &paths(&["/own"]),
            &paths(&["/loader"]),
            &paths(&["/run"]),
            true,
            &paths(&["/lib"]),
        );

        assert_eq!(order, paths(&["/run", "/lib"]));
    }

    #[test]
    fn find_takes_first_directory_with_name() {
        let sysroot = Sysroot::new();
        sysroot.write("/usr/lib/libz.so.1", b"second");
        sysroot.write("/opt/lib/libz.so.1", b"first");
        let dirs = paths(&["/missing", "/opt/lib", "/usr/lib"]);

        let result = find(&sysroot, "libz.so.1", &dirs);

        assert_eq!(
            result,
            LookupResult::Found(Found {
                path: sysroot.host("/opt/lib/libz.so.1"),
                inner_path: PathBuf::from("/opt/lib/libz.so.1"),
                real_path: sysroot.host("/opt/lib/libz.so.1"),
            })
        );
    }

    #[test]
    fn find_skips_directory_entry() {
        let sysroot = Sysroot::new();
        fs::create_dir_all(sysroot.host("/opt/lib/libz.so.1")).unwrap();
        sysroot.write("/usr/lib/libz.so.1", b"library");

        let result = find(&sysroot, "libz.so.1", &paths(&["/opt/lib", "/usr/lib"]));

        let LookupResult::Found(found) = result else {
            panic!("not found: {result:?}");
        };
        assert_eq!(found.real_path, sysroot.host("/usr/lib/libz.so.1"));
    }

    #[test]
    fn find_reuses_lookups_of_same_cache() {
        let sysroot = Sysroot::new();
        sysroot.write("/usr/lib/libz.so.1", b"library");
        let dirs = paths(&["/opt/lib", "/usr/lib"]);
        let cache = SearchCache::default();
        let first = find_library(sysroot.path(), &cache, "libz.so.1", &dirs, Path::new("/php"));
        fs::remove_file(sysroot.host("/usr/lib/libz.so.1")).unwrap();
        sysroot.write("/opt/lib/libz.so.1", b"library");

        let second = find_library(sysroot.path(), &cache, "libz.so.1", &dirs, Path::new("/php-fpm"));
        let fresh = find(&sysroot, "libz.so.1", &dirs);

        assert_eq!(second, first);
        let LookupResult::Found(found) = fresh else {
            panic!("not found: {fresh:?}");
        };
        assert_eq!(found.real_path, sysroot.host("/opt/lib/libz.so.1"));
    }

    #[test]
    fn find_reports_searched_directories() {
        let sysroot = Sysroot::new();
        let dirs = paths(&["/opt/lib", "/usr/lib"]);

        let result = find(&sysroot, "libz.so.1", &dirs);

        assert_eq!(result, LookupResult::NotFound { searched: dirs });
    }

    #[test]
    fn find_reports_search_dir_symlink_loop() {
        let sysroot = Sysroot::new();
        sysroot.symlink("/opt/lib", "/opt/lib");

        let result = find(&sysroot, "libz.so.1", &paths(&["/opt/lib"]));

        let LookupResult::Failed(problem) = result else {
            panic!("expected a failure: {result:?}");
        };
        let message = problem.to_string();
        assert!(message.contains("/php needs libz.so.1"), "message: {message}");
        assert!(message.contains("loop"), "message: {message}");
    }

    #[test]
    fn find_looks_up_absolute_path_inside_sysroot() {
        let sysroot = Sysroot::new();
        sysroot.write("/opt/vendor/libv.so", b"library");

        let result = find(&sysroot, "/opt/vendor/libv.so", &paths(&["/usr/lib"]));

        let LookupResult::Found(found) = result else {
            panic!("not found: {result:?}");
        };
        assert_eq!(found.real_path, sysroot.host("/opt/vendor/libv.so"));
    }
}
