//! `cargo xtask`: builds and tests the PHP layers for AWS Lambda.
//!
//! This file parses the flags and dispatches; each task lives in its own
//! module with one public `run` entry.

mod archive;
mod bench;
mod bench_build;
mod bench_publish;
mod bench_runtime;
mod build_layers;
mod build_root;
mod closure;
mod compile;
mod flags;
mod host;
mod layer;
mod matrix;
mod mirror;
mod php_check;
mod php_config;
mod process;
mod publish;
mod sources;
mod stage;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let flags = flags::Xtask::parse();
    let result = match flags.task {
        flags::Task::BuildLayers(args) => build_layers::run(&args).map(|_| ()),
        flags::Task::Test(args) => test::run(&args),
        flags::Task::Bench(args) => bench::run(&args),
        flags::Task::Publish(args) => publish::run(&args),
    };

    let Err(error) = result else {
        return ExitCode::SUCCESS;
    };
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    ExitCode::FAILURE
}

/// Returns the workspace root: the parent of this crate's directory.
pub fn project_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask/ has a parent directory")
        .to_path_buf()
}
