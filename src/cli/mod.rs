//! Command-line options (clap) of the analysis commands, each turned into the library's plain
//! configuration struct; `src/main.rs` only dispatches.

pub mod combine;
pub mod correspondence;
pub mod model_args;
pub mod patterns;
pub mod video_generation;

pub use model_args::ModelArgs;
