//! Placeholder until the launcher lands.
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    #[arg(required = true, allow_hyphen_values = true, num_args = 1..)]
    pub command: Vec<String>,
}
pub fn launch(_args: &LaunchArgs) -> anyhow::Result<i32> {
    anyhow::bail!("not yet")
}
