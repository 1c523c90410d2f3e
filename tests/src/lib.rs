//! Harness for the acceptance tests of the built layers.
//!
//! Each test unzips a layer and runs it with bubblewrap in an isolated root
//! that holds only what Lambda's base image provides to PHP: glibc's
//! libraries in `/lib64`, its gconv modules, a UTF-8 locale, and the layer
//! at `/opt`, with
//! Lambda's `LD_LIBRARY_PATH`. Decoy libraries in `/lib64` carry the sonames
//! of bundled libraries that the real base image also has, so a layer whose
//! objects lack the DT_RPATH to `/opt/lib` loads the decoys and fails.

pub mod fastcgi;
pub mod fault_proxy;
pub mod manifest;
pub mod moto;
pub mod runtime_api;
pub mod sandbox;
pub mod server_thread;

pub use manifest::{Layer, Manifest};
pub use sandbox::{LayerRoot, Output};
