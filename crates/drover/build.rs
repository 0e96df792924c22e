//! Links the `drover` executable as a fixed-address (non-PIE) executable on Linux.
//!
//! A position-independent drover carries ~1.9 MB of pointers in `.data.rel.ro` (vtables,
//! panic locations, static tables) that the dynamic loader must relocate at every start,
//! which writes every one of those pages and makes them private to the process: 1.9 MiB of
//! an idle agent's 11.2 MiB resident (docs/benchmarks.md). Linked at a fixed address they
//! need no relocation and stay shared, unread pages untouched. The cost is ASLR for the
//! executable's own image (libraries, heap, stack and mmap stay randomized), which is
//! also how Go links executables on Linux by default. Packagers who want a PIE set
//! `DROVER_PIE=1` when building.
fn main() {
    println!("cargo::rerun-if-env-changed=DROVER_PIE");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if linux && std::env::var_os("DROVER_PIE").is_none() {
        // Only the binary: test executables and libraries link as before. The objects are
        // still compiled position-independent, which links fine without PIE.
        println!("cargo::rustc-link-arg-bins=-no-pie");
    }
}
