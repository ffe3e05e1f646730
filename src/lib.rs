//! Support for the demo and the end-to-end tests: an impairing UDP relay that stands in for the
//! diode, a synthetic plant, and a reader for the services' metrics.

pub mod plant;
pub mod relay;
pub mod scrape;
pub mod service;
