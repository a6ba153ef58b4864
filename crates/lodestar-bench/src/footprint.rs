//! The footprint scenario.

use crate::harness::{Case, Result, Settings};

/// Runs the scenario.
pub(crate) async fn run(_settings: &Settings) -> Result<Vec<Case>> {
    Ok(Vec::new())
}
