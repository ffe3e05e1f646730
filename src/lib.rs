//! The programs around the two services: the command line `diode-send` and `diode-recv` share
//! (`service`), and for the demo, the end-to-end tests and the benchmarks an impairing UDP relay
//! that stands in for the diode, a synthetic plant, and a reader for the services' metrics.

pub mod plant;
pub mod relay;
pub mod scrape;
pub mod service;
