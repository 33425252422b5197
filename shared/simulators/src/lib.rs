//! Simulators of the APIs oppsync talks to, served over real HTTP on loopback: part of the
//! product (the demo, the tests and the benchmarks run against them).

pub mod chaos;
pub mod dataverse;
pub mod marketo;
pub mod oracle;
pub mod oversized;
mod query;

pub use chaos::Chaos;
pub use dataverse::{DataverseConfig, DataverseFault, DataverseSim};
pub use marketo::{Fault as MarketoFault, MarketoConfig, MarketoSim, Minimum, ResultShape};
