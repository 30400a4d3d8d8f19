//! `ibot demo`'s options: every `train` option, with the demo's own defaults put in front of
//! the user's (see [`with_defaults`]).

use clap::Args;

use super::presets::{subcommand_position, PRESETS};
use super::train::TrainArgs;
use crate::demo::{DemoConfig, FMNIST};

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct DemoArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Training-split images whose features form the k-NN memory.
    #[arg(long, default_value_t = 10000)]
    pub knn_train: usize,
    /// Test-split images classified by k-NN.
    #[arg(long, default_value_t = 2000)]
    pub knn_test: usize,
}

impl DemoArgs {
    pub fn into_config(self) -> DemoConfig {
        DemoConfig {
            train: self.train.into_config(),
            knn_train: self.knn_train,
            knn_test: self.knn_test,
        }
    }
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    crate::demo::run(&a.into_config())
}

/// Defaults of `ibot demo`, placed right after the subcommand, before the user's own options
/// (which therefore win).
pub const DEMO_DEFAULTS: &[&str] = &[
    "--preset",
    "fmnist_tiny",
    "--data_path",
    FMNIST,
    "--output_dir",
    "runs/fmnist-demo",
    "--subset",
    "20000",
    "--num_workers",
    "2",
];

/// The end of `ibot demo --help`: the defaults it really runs with (the option list above it
/// shows `train`'s, which the demo's replace).
pub fn demo_help() -> String {
    let mut pairs = Vec::new();
    for p in DEMO_DEFAULTS.chunks(2) {
        pairs.push(format!("  {} {}", p[0], p[1]));
    }
    let preset = PRESETS
        .iter()
        .find(|(n, _, _)| *n == "fmnist_tiny")
        .map(|(_, _, a)| a.join(" "))
        .unwrap_or_default();
    format!(
        "The demo runs with these defaults in place of train's (options you give win):\n{}\n\n\
         --preset fmnist_tiny stands for:\n  {preset}",
        pairs.join("\n")
    )
}

/// Puts [`DEMO_DEFAULTS`] right after the subcommand when the subcommand is `demo` (the first
/// argument that is neither an option nor the value of `--threads`); any other command line,
/// including one where `demo` is only the value of an option or a file name, is left alone.
pub fn with_defaults(argv: Vec<String>) -> Vec<String> {
    let Some(pos) = subcommand_position(&argv) else {
        return argv;
    };
    if argv[pos] != "demo" {
        return argv;
    }
    let mut out = argv[..=pos].to_vec();
    out.extend(DEMO_DEFAULTS.iter().map(|s| s.to_string()));
    out.extend(argv[pos + 1..].iter().cloned());
    out
}
