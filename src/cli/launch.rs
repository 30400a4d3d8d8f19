//! `ibot launch`: its options are [`crate::dist::launch::LaunchArgs`].

pub use crate::dist::launch::LaunchArgs;

/// Starts the workers and waits for them; exits with the first failing worker's code.
/// `threads` (`ibot --threads N launch ...`) is passed on to the workers.
pub fn run(mut l: LaunchArgs, threads: Option<i32>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        l.command
            .splice(1..1, ["--threads".to_string(), n.to_string()]);
    }
    let code = crate::dist::launch::launch(&l)?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}
