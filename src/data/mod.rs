//! Data: data sets, the official augmentation with Pillow's arithmetic, iBOT masks, and a
//! parallel deterministic loader.

pub mod augment;
pub mod cls;
pub mod dataset;
pub mod loader;
pub mod masking;
pub mod ops;
