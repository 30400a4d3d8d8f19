//! `ibot verify-fixture`'s options.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Fixture directory holding fixtures.json and fixtures.safetensors (e.g.
    /// ../shared/fixtures/ibot-ref/visible_vit), or trajectory.json and
    /// trajectory.safetensors (e.g. ../shared/fixtures/ibot-ref/visible_traj).
    pub dir: PathBuf,
}

/// Runs the comparison and prints the report; `Ok(false)` on any mismatch.
pub fn run(a: VerifyArgs) -> anyhow::Result<bool> {
    crate::verify::run(&a.dir)
}
