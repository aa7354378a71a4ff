#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod along;
pub mod bench;
mod context;
pub mod cpu;
mod engine;
mod error;
mod kernels;
mod layout;
mod ops;
mod options;
mod region;
mod tolerance;
mod training;
mod validate;

pub use along::Along;
pub use context::{enumerate_adapters, Context, ContextOptions};
pub use engine::Engine;
pub use error::{Error, Result};
pub use kernels::plan::{Capabilities, Strategy, Tuning};
pub use layout::AxisLayout;
pub use ops::{Tensor, TENSOR_USAGES};
pub use options::{CrossEntropyOptions, GradOutput, Reduction, Targets};
pub use region::BufferRegion;
pub use tolerance::{Comparison, Tolerance};
pub use training::{
    CrossEntropyBuffers, CrossEntropyLoss, DeviceGradOutput, GradDestination, LossAndGrad,
    TargetEncoding, TargetTensor,
};
pub use wgpu;
