//! End-to-end testing on a real Kubernetes control plane: the node agent
//! (`node`) and the harness the scenarios run on (`cluster`, `scenario`,
//! `slow_proxy`).

pub mod cluster;
pub mod node;
pub mod scenario;
pub mod service_proxy;
pub mod slow_proxy;

/// Tansu, the Kafka-compatible broker the runtime's and operator's tests use.
#[path = "../../runtime/tests/common/real_broker.rs"]
pub mod real_broker;
