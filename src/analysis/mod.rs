//! Looking inside trained models: what the [CLS] token attends to
//! (the official `analysis/attention_map`).

pub mod attention;
pub mod visualize;
