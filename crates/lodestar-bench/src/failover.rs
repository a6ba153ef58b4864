//! The failover scenario.

use crate::harness::{Case, Result, Settings};

/// The child processes of this scenario.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Child {}

/// Runs a child process of this scenario.
pub(crate) async fn child(child: Child) -> Result<()> {
    match child {}
}

/// Runs the scenario.
pub(crate) async fn run(_settings: &Settings) -> Result<Vec<Case>> {
    Ok(Vec::new())
}
