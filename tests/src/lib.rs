//! Shared support for the end-to-end suites and the programs behind `cargo xtask
//! conformance` and `cargo xtask bench`.

pub mod nats;
pub mod proxy;
pub mod unified;
pub mod verify;
pub mod workload;
