//! Packuilon's root package: it holds no code of its own, only the
//! end-to-end tests (`tests/`) that run the real binaries together against
//! a real RabbitMQ, Packer, Keystone and Glance. The work is done in
//! `crates/`, and so are the benchmarks (each crate's `benches/`, run by
//! `make bench`).
