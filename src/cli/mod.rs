//! Command-line options of the newer commands: one module per command, each a clap `Args`
//! struct with a method that turns it into the library's plain configuration and runs it.
//! `src/main.rs` only names the subcommand and dispatches.

pub mod common;
pub mod eval_copydetection;
pub mod eval_linear_multi;
pub mod eval_logreg;
pub mod eval_retrieval;
