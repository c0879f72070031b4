//! ferrotune's worker: joins a job through the coordinator, trains its data-parallel share of
//! a Llama-family model on libtorch, exchanges gradients with its peers, writes checkpoints.

pub mod agent;
pub mod checkpoint;
pub mod collective;
pub mod commands;
pub mod data;
pub mod device;
pub mod fault;
pub mod grads;
pub mod identity;
pub mod infer;
pub mod memory;
pub mod model;
pub mod optim;
pub mod precision;
pub mod report;
pub mod run;
pub mod session;
pub mod spec;
pub mod storage;
pub mod train;
pub mod zero;
