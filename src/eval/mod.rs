//! Evaluation protocols.

pub mod cluster;
pub mod features;
pub mod knn;
pub mod linear;
