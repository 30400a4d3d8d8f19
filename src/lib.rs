//! iBOT — Image BERT pre-training with Online Tokenizer — on libtorch through tch.
//!
//! Data flows one way: [`models`] (backbone, head, multi-crop wrapper) → [`loss`] (iBOT loss
//! with teacher centring) → [`train`] (schedules, optimizer, the step) → [`eval`] and
//! [`analysis`]. Parameters carry the official state-dict names ([`params`]), so official
//! weights load as they are, and [`verify`] checks everything against tensors produced by the
//! official code.

pub mod analysis;
pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod dist;
pub mod eval;
pub mod interop;
pub mod loss;
pub mod models;
pub mod params;
pub mod schedule;
pub mod train;
pub mod util;
pub mod verify;
