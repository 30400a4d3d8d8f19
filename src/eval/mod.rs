//! Evaluation protocols.

pub mod knn;
