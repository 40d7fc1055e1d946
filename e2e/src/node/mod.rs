//! `ocr-e2e-node`: a node agent for a real control plane without a kubelet.
//! It registers a Node and runs the containers of the pods bound to it as
//! local processes (image → local program by a table), each pod on an
//! address of its own added to the loopback interface.

pub mod agent;
pub mod config;
pub mod env;
pub mod launch;
pub mod pod;
pub mod probe;
pub mod status;
pub mod volumes;
