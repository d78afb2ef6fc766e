//! What the serving path records as it goes (statistics per model version, logs and trace spans),
//! with plain atomics and no knowledge of who reads it.

pub mod logging;
pub mod stats;
pub mod transport;
