//! Packuilon's root package: it holds no code of its own, only the
//! end-to-end tests (`tests/`) that run the real binaries together against
//! a real RabbitMQ, Packer, Keystone and Glance, and the benchmarks
//! (`benches/`, run by `make bench`). The work is done in `crates/`.
