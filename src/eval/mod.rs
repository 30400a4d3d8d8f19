//! Evaluation protocols.

pub mod cluster;
pub mod knn;
