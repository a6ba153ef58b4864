//! `greeter-client`: says hello to `greeter`, by name.

use std::time::Duration;

use clap::Parser;
use greeter::{GreeterClient, HelloRequest, SERVICE_NAME};
use lodestar::{Client, StaticRegistry};

/// Calls `helloworld.Greeter/SayHello` once and prints the reply.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address of a Greeter server (any language's), called as the one
    /// instance of `greeter`.
    #[arg(long, default_value = "127.0.0.1:50051", conflicts_with = "registry")]
    addr: String,
    /// Find `greeter` in this registry instead (lodestar://host:port).
    #[arg(long)]
    registry: Option<String>,
    /// Who to greet.
    #[arg(long, default_value = "world")]
    name: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let registry: std::sync::Arc<dyn lodestar::Registry> = match &args.registry {
        Some(url) => lodestar_registry::from_url(url)?,
        None => std::sync::Arc::new(StaticRegistry::new().with(SERVICE_NAME, [args.addr])),
    };
    let client = Client::builder(registry)
        .timeout(Duration::from_secs(10))
        .build();
    let mut greeter = GreeterClient::by_name(&client, SERVICE_NAME);
    let reply = greeter.say_hello(HelloRequest { name: args.name }).await?;
    println!("{}", reply.into_inner().message);
    Ok(())
}
