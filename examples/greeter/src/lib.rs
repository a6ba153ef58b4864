//! The gRPC hello-world `helloworld.Greeter` service on lodestar: the
//! smallest complete lodestar service.
//!
//! ```
//! use greeter::{GreeterClient, HelloRequest, MyGreeter};
//! use lodestar::{Client, MemoryRegistry, Service};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = MemoryRegistry::new();
//! let server = Service::builder("greeter")
//!     .registry(registry.clone())
//!     .add_service(MyGreeter.into_server())
//!     .start()
//!     .await?;
//!
//! let client = Client::new(registry);
//! let mut greeter = GreeterClient::by_name(&client, "greeter");
//! let reply = greeter.say_hello(HelloRequest { name: "Ada".into() }).await?;
//! assert_eq!(reply.into_inner().message, "Hello Ada!");
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

use lodestar::{Request, Response, Status};

/// Generated messages, server and client for the `helloworld` package.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod helloworld {
    lodestar::include_proto!("helloworld");
}

pub use helloworld::greeter_client::GreeterClient;
pub use helloworld::greeter_server::{Greeter, GreeterServer};
pub use helloworld::{HelloReply, HelloRequest};

/// The service name the examples register under.
pub const SERVICE_NAME: &str = "greeter";

/// Greets whoever asks.
#[derive(Debug, Default, Clone, Copy)]
pub struct MyGreeter;

impl MyGreeter {
    /// The generated server around this implementation.
    pub fn into_server(self) -> GreeterServer<Self> {
        GreeterServer::new(self)
    }
}

#[lodestar::async_trait]
impl Greeter for MyGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(HelloReply {
            message: format!("Hello {name}!"),
        }))
    }
}
