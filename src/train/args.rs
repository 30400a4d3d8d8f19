//! Where `ibot train`'s options used to live. The clap options are now
//! [`crate::cli::train::TrainArgs`], the configuration they fill [`crate::config::TrainConfig`];
//! these re-exports keep code written against the old paths compiling.

pub use crate::cli::presets::{expand_config_args, subcommand_position, PRESETS};
pub use crate::cli::train::TrainArgs;
pub use crate::cli::{parse_bool, DistArgs};
