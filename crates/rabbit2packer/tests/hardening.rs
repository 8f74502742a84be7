//! rabbit2packer under the faults operators meet (issue #16): a journal
//! deleted or unwritable, a full STATE_DIR or LOG_DIR (real tmpfs mounts),
//! a deleted lock, a packer that cannot start, broken reloads, hostile
//! values and large messages. Real daemon, RabbitMQ and packer, as in
//! `daemon.rs`.

mod support;

use support::*;

#[test]
fn an_overlong_personality_is_refused_naming_the_limit_and_showing_only_its_start() {
    let site = Site::new(1, "");
    let mut d = site.start();
    let long = "a".repeat(10_000);
    site.publish(&profile(&long, "7x", "a", prod()), Some("long-name"));
    let line = d.wait_log("message long-name", T);
    assert!(line.contains("1 to 128 characters"), "the limit is named: {line}");
    assert!(line.contains("(10000 characters)"), "{line}");
    assert!(line.len() < 1_000, "the value is cut: {} characters logged", line.len());
    d.stop();
}
