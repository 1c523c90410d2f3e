//! The walk from the roots over DT_NEEDED, level by level.
//!
//! Each level's objects are read, parsed and looked up in parallel with
//! rayon. The results are merged sequentially in the order of the level,
//! which is sorted, so the closure and its problems do not depend on thread
//! timing. As in ld.so, the first object that resolves a soname decides
//! which file the soname is.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::elf::{above_glibc_max, check_object, read_object, ElfObject, ParseError};
use super::search::{expand_search_path, find_library, search_order, Found, LookupResult, SearchCache};
use super::sysroot::host_path;
use super::{BundledLibrary, Closure, Problem, TargetPolicy};

/// Closure and unsorted problems of one walk.
pub struct WalkOutcome {
    pub closure: Closure,
    pub problems: Vec<Problem>,
}

/// An object to visit: a root or a library found for a soname.
#[derive(Clone, Debug)]
struct Node {
    /// Host path of the object: the root path as passed, or the library's
    /// path under its soname.
    path: PathBuf,
    /// Inner path of the same. Its directory is the object's $ORIGIN.
    inner_path: PathBuf,
    /// Host path after following symlinks inside the sysroot.
    real_path: PathBuf,
    /// Expanded DT_RPATH directories of the loaders, nearest loader first.
    loader_rpath: Vec<PathBuf>,
}

/// Failure to read or parse an object.
#[derive(Clone, Debug)]
enum ObjectFailure {
    Unreadable(String),
    Invalid(String),
}

/// Result of visiting one node.
struct Visit {
    object: Result<ElfObject, ObjectFailure>,
    /// DT_RPATH directories that the object's children inherit.
    child_rpath: Vec<PathBuf>,
    /// One entry per DT_NEEDED name that is not a system soname, in order.
    lookups: Vec<(String, LookupResult)>,
    problems: Vec<Problem>,
}

/// A soname in the closure, while the walk runs.
struct LibraryEntry {
    found: Found,
    /// The object whose lookup chose the file.
    first_needed_by: PathBuf,
    needed_by: BTreeSet<PathBuf>,
}

/// A DT_NEEDED name that one object's search did not find.
struct Missing {
    needed_by: PathBuf,
    soname: String,
    searched: Vec<PathBuf>,
}

/// Results merged from the levels visited so far.
#[derive(Default)]
struct WalkState {
    roots: BTreeSet<PathBuf>,
    /// Real host paths of the objects visited or queued, so that a file
    /// reached under two names is parsed once.
    queued_real_paths: BTreeSet<PathBuf>,
    /// Parse result of every visited object, by node path.
    objects: BTreeMap<PathBuf, Result<ElfObject, ObjectFailure>>,
    libraries: BTreeMap<String, LibraryEntry>,
    missing: Vec<Missing>,
    problems: Vec<Problem>,
}

/// Walks the DT_NEEDED graph from `roots` inside `sysroot`, checks every
/// object against `policy`, and returns the closure with every problem met.
pub fn walk(sysroot: &Path, roots: &[PathBuf], policy: &TargetPolicy) -> WalkOutcome {
    let mut state = WalkState::default();
    let cache = SearchCache::default();
    let mut level = state.queue_roots(sysroot, &cache, roots);

    while !level.is_empty() {
        let visits: Vec<Visit> = level
            .par_iter()
            .map(|node| visit(sysroot, policy, &cache, node))
            .collect();
        level = state.merge(level, visits);
    }

    state.finish(sysroot, policy)
}

/// Reads and parses one object, expands its DT_RPATH and DT_RUNPATH, and
/// looks up its DT_NEEDED names. The checks against the policy run later.
///
/// The names of an object of the wrong architecture are not looked up,
/// because its dependencies would be those of another build.
fn visit(sysroot: &Path, policy: &TargetPolicy, cache: &SearchCache, node: &Node) -> Visit {
    let failed = |failure| Visit {
        object: Err(failure),
        child_rpath: Vec::new(),
        lookups: Vec::new(),
        problems: Vec::new(),
    };

    let parsed = fs::File::open(&node.real_path)
        .map_err(ParseError::Unreadable)
        .and_then(|file| read_object(&file, &|version| above_glibc_max(version, policy)));
    let object = match parsed {
        Ok(object) => object,
        Err(ParseError::Unreadable(error)) => return failed(ObjectFailure::Unreadable(error.to_string())),
        Err(ParseError::Invalid(reason)) => return failed(ObjectFailure::Invalid(reason)),
    };

    if object.kind != policy.machine.expected_kind() {
        return Visit {
            object: Ok(object),
            child_rpath: Vec::new(),
            lookups: Vec::new(),
            problems: Vec::new(),
        };
    }

    let origin = node.inner_path.parent().unwrap_or(Path::new("/"));
    let (rpath, mut problems) = expand_search_path(&object.rpath, origin, "DT_RPATH", &node.path);
    let (runpath, runpath_problems) = expand_search_path(&object.runpath, origin, "DT_RUNPATH", &node.path);
    problems.extend(runpath_problems);

    // An object with a DT_RUNPATH ignores its own DT_RPATH, also for the
    // objects it loads.
    let has_runpath = !object.runpath.is_empty();
    let own_rpath = if has_runpath { Vec::new() } else { rpath };
    let dirs = search_order(
        &own_rpath,
        &node.loader_rpath,
        &runpath,
        has_runpath,
        &policy.search_dirs,
    );

    let mut lookups = Vec::new();
    for name in &object.needed {
        if policy.system_sonames.contains(name) {
            continue;
        }
        if name.contains('/') {
            problems.push(Problem::PathNeeded {
                needed_by: node.path.clone(),
                name: name.clone(),
            });

            // A relative path names no file inside the sysroot. An absolute
            // one is still followed, to report the problems of its closure.
            if !name.starts_with('/') {
                continue;
            }
        }
        let result = find_library(sysroot, cache, name, &dirs, &node.path);
        lookups.push((name.clone(), result));
    }

    let mut child_rpath = own_rpath;
    child_rpath.extend(node.loader_rpath.iter().cloned());

    Visit {
        object: Ok(object),
        child_rpath,
        lookups,
        problems,
    }
}

impl WalkState {
    /// Returns the nodes of the roots, sorted and without duplicates, and
    /// records a problem for each root that cannot be visited.
    fn queue_roots(&mut self, sysroot: &Path, cache: &SearchCache, roots: &[PathBuf]) -> Vec<Node> {
        let unique: BTreeSet<&PathBuf> = roots.iter().collect();
        let mut nodes = Vec::new();

        for root in unique {
            let Some(inner_path) = inner_path_of(sysroot, root) else {
                self.problems.push(Problem::RootOutsideSysroot {
                    root: root.clone(),
                    sysroot: sysroot.to_owned(),
                });
                continue;
            };

            let real_inner = match cache.real_path(sysroot, &inner_path) {
                Ok(Some(real_inner)) => real_inner,
                Ok(None) => {
                    self.problems.push(Problem::Unreadable {
                        file: root.clone(),
                        needed_by: Vec::new(),
                        message: "no such file inside the sysroot".to_owned(),
                    });
                    continue;
                }
                Err(error) => {
                    self.problems.push(Problem::BadPath {
                        needed_by: None,
                        soname: None,
                        path: inner_path,
                        sysroot: sysroot.to_owned(),
                        reason: error.to_string(),
                    });
                    continue;
                }
            };

            self.roots.insert(root.clone());
            let real_path = host_path(sysroot, &real_inner);
            if !self.queued_real_paths.insert(real_path.clone()) {
                continue;
            }
            nodes.push(Node {
                path: root.clone(),
                inner_path,
                real_path,
                loader_rpath: Vec::new(),
            });
        }

        nodes
    }

    /// Merges the visits of one level, in the level's order, and returns the
    /// next level: the libraries found for the first time.
    fn merge(&mut self, level: Vec<Node>, visits: Vec<Visit>) -> Vec<Node> {
        let mut next_level = Vec::new();

        for (node, visit) in level.into_iter().zip(visits) {
            self.problems.extend(visit.problems);

            for (soname, result) in visit.lookups {
                let found = match result {
                    LookupResult::Found(found) => found,
                    LookupResult::NotFound { searched } => {
                        self.missing.push(Missing {
                            needed_by: node.path.clone(),
                            soname,
                            searched,
                        });
                        continue;
                    }
                    LookupResult::Failed(problem) => {
                        self.problems.push(problem);
                        continue;
                    }
                };

                match self.libraries.entry(soname) {
                    Entry::Occupied(mut entry) => {
                        let soname = entry.key().clone();
                        let library = entry.get_mut();
                        library.needed_by.insert(node.path.clone());
                        if library.found.real_path != found.real_path {
                            self.problems.push(Problem::ConflictingSoname {
                                soname,
                                first: library.found.path.clone(),
                                first_needed_by: library.first_needed_by.clone(),
                                second: found.path,
                                second_needed_by: node.path.clone(),
                            });
                        }
                    }
                    Entry::Vacant(entry) => {
                        if self.queued_real_paths.insert(found.real_path.clone()) {
                            next_level.push(Node {
                                path: found.path.clone(),
                                inner_path: found.inner_path.clone(),
                                real_path: found.real_path.clone(),
                                loader_rpath: visit.child_rpath.clone(),
                            });
                        }
                        entry.insert(LibraryEntry {
                            found,
                            first_needed_by: node.path.clone(),
                            needed_by: BTreeSet::from([node.path.clone()]),
                        });
                    }
                }
            }

            self.objects.insert(node.path, visit.object);
        }

        next_level.sort_by(|left, right| left.path.cmp(&right.path));
        next_level
    }

    /// Reports the names that no search found, checks every object against
    /// the policy, and builds the closure.
    fn finish(mut self, sysroot: &Path, policy: &TargetPolicy) -> WalkOutcome {
        // A name that one object's search misses but another's finds is in
        // the layer's /opt/lib at run time, so it is not a problem.
        for missing in std::mem::take(&mut self.missing) {
            match self.libraries.get_mut(&missing.soname) {
                Some(library) => {
                    library.needed_by.insert(missing.needed_by);
                }
                None => self.problems.push(Problem::NotFound {
                    needed_by: missing.needed_by,
                    soname: missing.soname,
                    searched: missing.searched,
                    sysroot: sysroot.to_owned(),
                }),
            }
        }

        let mut needed_by_path: BTreeMap<&Path, Vec<PathBuf>> = BTreeMap::new();
        for library in self.libraries.values() {
            needed_by_path
                .entry(&library.found.path)
                .or_default()
                .extend(library.needed_by.iter().cloned());
        }

        for (path, object) in &self.objects {
            let needed_by = match needed_by_path.get(path.as_path()) {
                Some(needed_by) if !self.roots.contains(path) => needed_by.clone(),
                _ => Vec::new(),
            };
            let problem = match object {
                Ok(object) => {
                    self.problems.extend(check_object(path, &needed_by, object, policy));
                    continue;
                }
                Err(ObjectFailure::Unreadable(message)) => Problem::Unreadable {
                    file: path.clone(),
                    needed_by,
                    message: message.clone(),
                },
                Err(ObjectFailure::Invalid(reason)) => Problem::InvalidElf {
                    file: path.clone(),
                    needed_by,
                    reason: reason.clone(),
                },
            };
            self.problems.push(problem);
        }

        let libraries = self
            .libraries
            .into_iter()
            .map(|(soname, library)| BundledLibrary {
                soname,
                path: library.found.path,
                real_path: library.found.real_path,
                needed_by: library.needed_by.into_iter().collect(),
            })
            .collect();

        WalkOutcome {
            closure: Closure { libraries },
            problems: self.problems,
        }
    }
}

/// Returns the inner path of `root`, a host path inside `sysroot`, or None
/// when it is outside.
///
/// The paths are compared as written first, then with the sysroot and the
/// root's directory canonicalized, so that a root under a symlinked
/// temporary directory still matches.
fn inner_path_of(sysroot: &Path, root: &Path) -> Option<PathBuf> {
    if let Ok(relative) = root.strip_prefix(sysroot) {
        return Some(Path::new("/").join(relative));
    }

    let canonical_sysroot = fs::canonicalize(sysroot).ok()?;
    let canonical_dir = fs::canonicalize(root.parent()?).ok()?;
    let canonical_root = canonical_dir.join(root.file_name()?);
    let relative = canonical_root.strip_prefix(&canonical_sysroot).ok()?;
    Some(Path::new("/").join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::closure::elf::glibc_release;
    use crate::closure::fixtures::{
        self, foreign_machine, host_machine, lib_dir, set_e_machine, standard_sysroot, Sysroot,
    };
    use crate::closure::{resolve_closure, ClosureError, ElfKind};

    fn resolve(sysroot: &Sysroot, roots: &[PathBuf], policy: &TargetPolicy) -> Result<Closure, ClosureError> {
        resolve_closure(sysroot.path(), roots, policy)
    }

    fn resolve_root(sysroot: &Sysroot, root: &Path, policy: &TargetPolicy) -> Result<Closure, ClosureError> {
        resolve_closure(sysroot.path(), &[root.to_path_buf()], policy)
    }

    fn problems_of(result: Result<Closure, ClosureError>) -> Vec<Problem> {
        match result {
            Ok(closure) => panic!("expected problems, got the closure {closure:?}"),
            Err(error) => error.problems,
        }
    }

    fn sonames(closure: &Closure) -> Vec<&str> {
        closure
            .libraries
            .iter()
            .map(|library| library.soname.as_str())
            .collect()
    }

    fn library<'a>(closure: &'a Closure, soname: &str) -> &'a BundledLibrary {
        closure
            .libraries
            .iter()
            .find(|library| library.soname == soname)
            .unwrap_or_else(|| panic!("{soname} is not in the closure {:?}", sonames(closure)))
    }

    /// Builds /build/stage/lib/liborigin.so.1 and the root
    /// /build/stage/bin/php-origin with DT_RPATH $ORIGIN/../lib.
    fn add_origin_root(sysroot: &Sysroot) -> PathBuf {
        let liborigin = sysroot.library(
            "/build/stage/lib/liborigin.so.1",
            "liborigin.so.1",
            "int origin(void) { return 3; }\n",
            &[],
        );
        sysroot.executable(
            "/build/stage/bin/php-origin",
            "int origin(void);\nint main(void) { return origin(); }\n",
            &[
                liborigin.display().to_string(),
                "-Wl,--disable-new-dtags".to_owned(),
                "-Wl,-rpath,$ORIGIN/../lib".to_owned(),
            ],
        )
    }

    /// Builds a second libfoo.so.1 at `inner`, a different file from the
    /// standard one.
    fn add_other_libfoo(sysroot: &Sysroot, inner: &str) -> PathBuf {
        sysroot.library(inner, "libfoo.so.1", "int foo(void) { return 20; }\n", &[])
    }

    #[test]
    fn closure_of_standard_sysroot() {
        let (sysroot, objects) = standard_sysroot();
        let lib_dir = lib_dir();

        let closure = resolve_root(&sysroot, &objects.php, &sysroot.policy()).unwrap();

        let expected = Closure {
            libraries: vec![
                BundledLibrary {
                    soname: "libbase.so.1".to_owned(),
                    path: sysroot.host(&format!("{lib_dir}/libbase.so.1")),
                    real_path: sysroot.host(&format!("{lib_dir}/libbase.so.1.2.3")),
                    needed_by: vec![objects.libmid.clone()],
                },
                BundledLibrary {
                    soname: "libfoo.so.1".to_owned(),
                    path: sysroot.host(&format!("{lib_dir}/libfoo.so.1")),
                    real_path: sysroot.host(&format!("{lib_dir}/libfoo.so.1.0")),
                    needed_by: vec![objects.php.clone()],
                },
                BundledLibrary {
                    soname: "libmid.so.2".to_owned(),
                    path: objects.libmid.clone(),
                    real_path: objects.libmid.clone(),
                    needed_by: vec![objects.php.clone()],
                },
            ],
        };
        assert_eq!(closure, expected);
    }

    #[test]
    fn absolute_symlink_resolves_inside_sysroot() {
        let (sysroot, objects) = standard_sysroot();

        let closure = resolve_root(&sysroot, &objects.php, &sysroot.policy()).unwrap();

        let libfoo = library(&closure, "libfoo.so.1");
        assert!(
            libfoo.real_path.starts_with(sysroot.path()),
            "real path {}",
            libfoo.real_path.display()
        );
        assert_eq!(libfoo.real_path, sysroot.host(&format!("{}/libfoo.so.1.0", lib_dir())));
    }

    #[test]
    fn system_soname_is_not_bundled() {
        let (sysroot, objects) = standard_sysroot();
        let mut policy = sysroot.policy();

        let closure = resolve_root(&sysroot, &objects.php, &policy).unwrap();
        policy.system_sonames.clear();
        let problems = problems_of(resolve_root(&sysroot, &objects.php, &policy));

        assert!(
            !sonames(&closure).contains(&"libc.so.6"),
            "sonames {:?}",
            sonames(&closure)
        );
        // Without the policy entry, the sysroot has no libc.so.6 to offer.
        assert!(
            problems.iter().any(|problem| matches!(
                problem,
                Problem::NotFound { soname, needed_by, .. } if soname == "libc.so.6" && *needed_by == objects.php
            )),
            "problems: {problems:?}"
        );
    }

    #[test]
    fn rpath_wins_over_search_dirs() {
        let (sysroot, objects) = standard_sysroot();
        let rpath_copy = add_other_libfoo(&sysroot, "/opt/lib/libfoo.so.1");

        let closure = resolve_root(&sysroot, &objects.php, &sysroot.policy()).unwrap();

        let libfoo = library(&closure, "libfoo.so.1");
        assert_eq!(libfoo.path, rpath_copy);
        assert_eq!(libfoo.real_path, rpath_copy);
    }

    #[test]
    fn loader_rpath_applies_to_dependencies() {
        let (sysroot, objects) = standard_sysroot();
        // libmid.so.2 has no DT_RPATH, so its libbase.so.1 comes from the
        // DT_RPATH of php, the object that loaded it.
        let base_copy = sysroot.host("/opt/lib/libbase.so.1");
        fs::create_dir_all(base_copy.parent().unwrap()).unwrap();
        fs::copy(sysroot.host(&format!("{}/libbase.so.1.2.3", lib_dir())), &base_copy).unwrap();

        let closure = resolve_root(&sysroot, &objects.php, &sysroot.policy()).unwrap();

        assert_eq!(library(&closure, "libbase.so.1").real_path, base_copy);
    }

    #[test]
    fn origin_expands_to_object_directory() {
        let (sysroot, _) = standard_sysroot();
        let root = add_origin_root(&sysroot);

        let closure = resolve_root(&sysroot, &root, &sysroot.policy()).unwrap();

        let liborigin = library(&closure, "liborigin.so.1");
        assert_eq!(liborigin.real_path, sysroot.host("/build/stage/lib/liborigin.so.1"));
        assert_eq!(liborigin.needed_by, vec![root]);
    }

    #[test]
    fn missing_library_is_reported() {
        let (sysroot, objects) = standard_sysroot();
        fs::remove_file(sysroot.host(&format!("{}/libbase.so.1", lib_dir()))).unwrap();
        let policy = sysroot.policy();

        let problems = problems_of(resolve_root(&sysroot, &objects.php, &policy));

        let mut searched = vec![PathBuf::from("/opt/lib")];
        searched.extend(policy.search_dirs.iter().cloned());
        assert_eq!(
            problems,
            vec![Problem::NotFound {
                needed_by: objects.libmid.clone(),
                soname: "libbase.so.1".to_owned(),
                searched,
                sysroot: sysroot.path().to_owned(),
            }]
        );
        let message = problems[0].to_string();
        assert!(message.starts_with(&format!(
            "{} needs libbase.so.1, which is not in /opt/lib, ",
            objects.libmid.display()
        )));
        assert!(
            message.contains("install the package that ships libbase.so.1"),
            "message: {message}"
        );
    }

    #[test]
    fn foreign_machine_library_is_rejected() {
        let (sysroot, objects) = standard_sysroot();
        let libfoo_inner = format!("{}/libfoo.so.1.0", lib_dir());
        set_e_machine(&sysroot.host(&libfoo_inner), foreign_machine());
        // A good copy later in the search path must not hide the foreign one.
        add_other_libfoo(&sysroot, "/usr/lib/libfoo.so.1");

        let problems = problems_of(resolve_root(&sysroot, &objects.php, &sysroot.policy()));

        assert_eq!(
            problems,
            vec![Problem::WrongArchitecture {
                file: sysroot.host(&format!("{}/libfoo.so.1", lib_dir())),
                needed_by: vec![objects.php.clone()],
                found: ElfKind {
                    machine: foreign_machine().e_machine(),
                    is_64: true,
                    little_endian: true,
                },
                expected: host_machine().expected_kind(),
            }]
        );
        let message = problems[0].to_string();
        assert!(
            message.contains(&format!("(needed by {})", objects.php.display())),
            "message: {message}"
        );
        assert!(message.contains("but the target needs EM_"), "message: {message}");
    }

    #[test]
    fn foreign_machine_root_is_rejected() {
        let (sysroot, objects) = standard_sysroot();
        set_e_machine(&objects.php, foreign_machine());

        let problems = problems_of(resolve_root(&sysroot, &objects.php, &sysroot.policy()));

        assert_eq!(problems.len(), 1, "problems: {problems:?}");
        let message = problems[0].to_string();
        assert!(
            message.starts_with(&format!("root {} is EM_", objects.php.display())),
            "message: {message}"
        );
    }

    // hypot@GLIBC_2.35 exists on x86_64 only from glibc 2.35 on, and the
    // fixtures are built with the host's glibc (2.36 on Debian bookworm).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn glibc_version_above_max_is_rejected() {
        let (sysroot, objects) = standard_sysroot();
        let libhypot = sysroot.library(
            &format!("{}/libhypot.so.1", lib_dir()),
            "libhypot.so.1",
            fixtures::HYPOT_SOURCE,
            &["-lm".to_owned()],
        );
        let root = sysroot.executable(
            "/build/stage/bin/php-hypot",
            "double distance(double, double);\nint main(void) { return (int) distance(3, 4); }\n",
            &[libhypot.display().to_string()],
        );

        let problems = problems_of(resolve(&sysroot, &[root, objects.php], &sysroot.policy()));

        assert_eq!(
            problems,
            vec![Problem::GlibcTooNew {
                file: libhypot.clone(),
                version: "GLIBC_2.35".to_owned(),
                symbol: Some("hypot".to_owned()),
                library: "libm.so.6".to_owned(),
                glibc_max: "2.34".parse().unwrap(),
            }]
        );
        let message = problems[0].to_string();
        assert!(message.contains("hypot@GLIBC_2.35"), "message: {message}");
        assert!(
            message.contains("build against an older glibc (the build root)"),
            "message: {message}"
        );
    }

    #[test]
    fn glibc_max_below_libc_baseline_is_rejected() {
        let (sysroot, objects) = standard_sysroot();
        let mut policy = sysroot.policy();
        policy.glibc_max = "2.2".parse().unwrap();

        let problems = problems_of(resolve_root(&sysroot, &objects.php, &policy));

        let php_problem = problems
            .iter()
            .find_map(|problem| match problem {
                Problem::GlibcTooNew {
                    file,
                    version,
                    symbol,
                    library,
                    ..
                } if *file == objects.php => Some((version, symbol, library)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no glibc problem for php: {problems:?}"));
        let (version, symbol, library) = php_problem;
        assert!(glibc_release(version).unwrap() > (2, 2, 0), "version {version}");
        assert!(symbol.is_some(), "no symbol named for {version}");
        assert_eq!(library, "libc.so.6");
    }

    #[test]
    fn runpath_on_root_is_rejected() {
        let (sysroot, objects) = standard_sysroot();
        let root = sysroot.executable(
            "/build/stage/bin/php-runpath",
            "int mid(void);\nint main(void) { return mid(); }\n",
            &[
                objects.libmid.display().to_string(),
                "-Wl,--enable-new-dtags".to_owned(),
                "-Wl,-rpath,/opt/lib".to_owned(),
            ],
        );

        let problems = problems_of(resolve_root(&sysroot, &root, &sysroot.policy()));

        assert_eq!(
            problems,
            vec![Problem::Runpath {
                file: root,
                runpath: "/opt/lib".to_owned(),
            }]
        );
        assert!(problems[0].to_string().contains("-Wl,--disable-new-dtags"));
    }

    #[test]
    fn runpath_on_bundled_library_is_rejected() {
        let (sysroot, objects) = standard_sysroot();
        let lib_dir = lib_dir();
        sysroot.library(
            &format!("{lib_dir}/libmid.so.2"),
            "libmid.so.2",
            "int base(void);\nint mid(void) { return base() + 1; }\n",
            &[
                sysroot
                    .host(&format!("{lib_dir}/libbase.so.1.2.3"))
                    .display()
                    .to_string(),
                "-Wl,--enable-new-dtags".to_owned(),
                "-Wl,-rpath,$ORIGIN".to_owned(),
            ],
        );

        let problems = problems_of(resolve_root(&sysroot, &objects.php, &sysroot.policy()));

        assert_eq!(
            problems,
            vec![Problem::Runpath {
                file: objects.libmid,
                runpath: "$ORIGIN".to_owned(),
            }]
        );
    }

    #[test]
    fn text_root_is_rejected() {
        let sysroot = Sysroot::new();
        let root = sysroot.write("/build/stage/bin/php", b"#!/bin/sh\nexec php \"$@\"\n");

        let problems = problems_of(resolve_root(&sysroot, &root, &sysroot.policy()));

        assert_eq!(problems.len(), 1, "problems: {problems:?}");
        assert!(
            matches!(&problems[0], Problem::InvalidElf { file, needed_by, .. } if *file == root && needed_by.is_empty()),
            "problem: {:?}",
            problems[0]
        );
        assert!(problems[0].to_string().contains("ELF magic"));
    }

    #[test]
    fn truncated_library_is_rejected() {
        let (sysroot, objects) = standard_sysroot();
        let lib_dir = lib_dir();
        let real_file = sysroot.host(&format!("{lib_dir}/libbase.so.1.2.3"));
        let bytes = fs::read(&real_file).unwrap();
        fs::write(&real_file, &bytes[..100]).unwrap();

        let problems = problems_of(resolve_root(&sysroot, &objects.php, &sysroot.policy()));

        assert_eq!(problems.len(), 1, "problems: {problems:?}");
        let Problem::InvalidElf { file, needed_by, .. } = &problems[0] else {
            panic!("unexpected problem: {:?}", problems[0]);
        };
        assert_eq!(*file, sysroot.host(&format!("{lib_dir}/libbase.so.1")));
        assert_eq!(*needed_by, vec![objects.libmid.clone()]);
        let message = problems[0].to_string();
        assert!(
            message.contains(&format!("(needed by {})", objects.libmid.display())),
            "message: {message}"
        );
    }

    #[test]
    fn symlink_escaping_sysroot_is_rejected() {
        let (sysroot, objects) = standard_sysroot();
        let link = format!("{}/libfoo.so.1", lib_dir());
        fs::remove_file(sysroot.host(&link)).unwrap();
        sysroot.symlink(&link, "../../../../../../../../etc/hostname");

        let problems = problems_of(resolve_root(&sysroot, &objects.php, &sysroot.policy()));

        assert_eq!(problems.len(), 1, "problems: {problems:?}");
        assert!(
            matches!(&problems[0], Problem::BadPath { needed_by: Some(needer), .. } if *needer == objects.php),
            "problem: {:?}",
            problems[0]
        );
        assert!(problems[0].to_string().contains("leads outside the sysroot"));
    }

    #[test]
    fn conflicting_soname_is_reported() {
        let (sysroot, objects) = standard_sysroot();
        let other = add_other_libfoo(&sysroot, "/opt/vendor/libfoo.so.1");
        let vendor_root = sysroot.executable(
            "/build/stage/bin/php-vendor",
            "int foo(void);\nint main(void) { return foo(); }\n",
            &[
                other.display().to_string(),
                "-Wl,--disable-new-dtags".to_owned(),
                "-Wl,-rpath,/opt/vendor".to_owned(),
            ],
        );

        let problems = problems_of(resolve(
            &sysroot,
            &[objects.php.clone(), vendor_root.clone()],
            &sysroot.policy(),
        ));

        assert_eq!(
            problems,
            vec![Problem::ConflictingSoname {
                soname: "libfoo.so.1".to_owned(),
                first: sysroot.host(&format!("{}/libfoo.so.1", lib_dir())),
                first_needed_by: objects.php,
                second: other,
                second_needed_by: vendor_root,
            }]
        );
    }

    #[test]
    fn root_outside_sysroot_is_rejected() {
        let (sysroot, objects) = standard_sysroot();
        let elsewhere = tempfile::tempdir().unwrap();
        let outside = elsewhere.path().join("php");
        fs::copy(&objects.php, &outside).unwrap();

        let problems = problems_of(resolve_root(&sysroot, &outside, &sysroot.policy()));

        assert_eq!(
            problems,
            vec![Problem::RootOutsideSysroot {
                root: outside,
                sysroot: sysroot.path().to_owned(),
            }]
        );
    }

    #[test]
    fn needed_path_is_rejected() {
        let (sysroot, _) = standard_sysroot();
        // Without DT_SONAME, ld records the path it linked as DT_NEEDED.
        let no_soname = sysroot.executable(
            "/opt/vendor/libnosoname.so",
            "int vendor(void) { return 4; }\n",
            &["-shared".to_owned(), "-fPIC".to_owned()],
        );
        let root = sysroot.executable(
            "/build/stage/bin/php-path",
            "int vendor(void);\nint main(void) { return vendor(); }\n",
            &[no_soname.display().to_string()],
        );

        let problems = problems_of(resolve_root(&sysroot, &root, &sysroot.policy()));

        assert!(
            problems.iter().any(|problem| matches!(
                problem,
                Problem::PathNeeded { needed_by, name } if *needed_by == root && name.ends_with("/opt/vendor/libnosoname.so")
            )),
            "problems: {problems:?}"
        );
    }

    #[test]
    fn resolve_is_deterministic() {
        let (sysroot, objects) = standard_sysroot();
        let origin_root = add_origin_root(&sysroot);
        let extension = sysroot.library(
            "/build/stage/lib/php/extensions/mid.so",
            "mid.so",
            "int mid(void); int base(void);\nint extension(void) { return mid() + base(); }\n",
            &[
                objects.libmid.display().to_string(),
                sysroot
                    .host(&format!("{}/libbase.so.1.2.3", lib_dir()))
                    .display()
                    .to_string(),
            ],
        );
        let roots = vec![objects.php.clone(), origin_root.clone(), extension.clone()];
        let reversed: Vec<PathBuf> = roots.iter().rev().cloned().collect();
        let policy = sysroot.policy();

        let first = resolve(&sysroot, &roots, &policy).unwrap();
        let second = resolve(&sysroot, &roots, &policy).unwrap();
        let from_reversed = resolve(&sysroot, &reversed, &policy).unwrap();

        assert_eq!(first, second);
        assert_eq!(first, from_reversed);
        assert_eq!(
            sonames(&first),
            vec!["libbase.so.1", "libfoo.so.1", "libmid.so.2", "liborigin.so.1"]
        );
        let mut needers_of_base = vec![extension, objects.libmid.clone()];
        needers_of_base.sort();
        assert_eq!(library(&first, "libbase.so.1").needed_by, needers_of_base);
    }

    #[test]
    fn several_problems_reported_together() {
        let (sysroot, objects) = standard_sysroot();
        let lib_dir = lib_dir();
        fs::remove_file(sysroot.host(&format!("{lib_dir}/libbase.so.1"))).unwrap();
        set_e_machine(&sysroot.host(&format!("{lib_dir}/libfoo.so.1.0")), foreign_machine());
        let text_root = sysroot.write("/build/stage/bin/php-config", b"#!/bin/sh\n");
        let runpath_root = sysroot.executable(
            "/build/stage/bin/php-runpath",
            "int main(void) { return 0; }\n",
            &["-Wl,--enable-new-dtags".to_owned(), "-Wl,-rpath,/opt/lib".to_owned()],
        );

        let error = resolve(
            &sysroot,
            &[objects.php.clone(), text_root, runpath_root],
            &sysroot.policy(),
        )
        .unwrap_err();

        let kinds: Vec<&str> = error
            .problems
            .iter()
            .map(|problem| match problem {
                Problem::NotFound { .. } => "not found",
                Problem::WrongArchitecture { .. } => "wrong architecture",
                Problem::InvalidElf { .. } => "invalid ELF",
                Problem::Runpath { .. } => "runpath",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds.len(), 4, "problems: {:?}", error.problems);
        for kind in ["not found", "wrong architecture", "invalid ELF", "runpath"] {
            assert!(kinds.contains(&kind), "no {kind} problem in {:?}", error.problems);
        }
        let message = error.to_string();
        assert!(
            message.starts_with("the shared-library closure has 4 problems:"),
            "message: {message}"
        );
        assert_eq!(message.matches("\n  - ").count(), 4, "message: {message}");
    }
}
