//! `route-guide-client`: the canonical RouteGuide client run, calling the
//! service by name.

use std::time::Duration;

use clap::Parser;
use lodestar::{Client, StaticRegistry};
use route_guide::{Point, Rectangle, RouteGuideClient, RouteNote, SERVICE_NAME, load_features};
use tokio_stream::StreamExt;

/// Runs GetFeature, ListFeatures, RecordRoute and RouteChat against `route-guide`.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address of a RouteGuide server (any language's), called as the one
    /// instance of `route-guide`.
    #[arg(long, default_value = "127.0.0.1:10000", conflicts_with = "registry")]
    addr: String,
    /// Find `route-guide` in this registry instead (lodestar://host:port).
    #[arg(long)]
    registry: Option<String>,
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
    let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);

    println!("*** GetFeature");
    for point in [
        Point {
            latitude: 409_146_138,
            longitude: -746_188_906,
        },
        Point {
            latitude: 0,
            longitude: 0,
        },
    ] {
        let feature = guide.get_feature(point).await?.into_inner();
        println!("{feature:?}");
    }

    println!("*** ListFeatures");
    let rect = Rectangle {
        lo: Some(Point {
            latitude: 400_000_000,
            longitude: -750_000_000,
        }),
        hi: Some(Point {
            latitude: 420_000_000,
            longitude: -730_000_000,
        }),
    };
    let mut stream = guide.list_features(rect).await?.into_inner();
    let mut listed = 0;
    while let Some(feature) = stream.next().await {
        let feature = feature?;
        listed += 1;
        println!("{feature:?}");
    }
    println!("{listed} features");

    println!("*** RecordRoute");
    let features = load_features();
    let points: Vec<Point> = (0..10)
        .filter_map(|i| features[(i * 37) % features.len()].location)
        .collect();
    let summary = guide
        .record_route(tokio_stream::iter(points))
        .await?
        .into_inner();
    println!("{summary:?}");

    println!("*** RouteChat");
    let at = |lat, lon, message: &str| RouteNote {
        location: Some(Point {
            latitude: lat,
            longitude: lon,
        }),
        message: message.to_owned(),
    };
    let notes = vec![
        at(0, 1, "First message"),
        at(0, 2, "Second message"),
        at(0, 3, "Third message"),
        at(0, 1, "Fourth message"),
        at(0, 2, "Fifth message"),
        at(0, 3, "Sixth message"),
    ];
    let mut replies = guide
        .route_chat(tokio_stream::iter(notes))
        .await?
        .into_inner();
    while let Some(note) = replies.next().await {
        let note = note?;
        let location = note.location.unwrap_or_default();
        println!(
            "got message \"{}\" at point({}, {})",
            note.message, location.latitude, location.longitude
        );
    }
    Ok(())
}
