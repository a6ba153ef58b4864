//! The RouteGuide service of the gRPC examples, on lodestar.
//!
//! It shows all four call kinds: `GetFeature` (unary), `ListFeatures`
//! (server streaming), `RecordRoute` (client streaming) and `RouteChat`
//! (bidirectional). It is wire- and behaviour-compatible with the standard
//! example, so any language's RouteGuide client works against
//! [`RouteGuideService`], and our client against theirs.
//!
//! The feature data (`data/route_guide_db.json`) is our own: 100 places in
//! the box 40–42°N, 73–75°W, some of them unnamed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lodestar::{Request, Response, Status, Streaming};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

/// Generated messages, server and client for the `routeguide` package.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod routeguide {
    lodestar::include_proto!("routeguide");
}

pub use routeguide::route_guide_client::RouteGuideClient;
pub use routeguide::route_guide_server::{RouteGuide, RouteGuideServer};
pub use routeguide::{Feature, Point, Rectangle, RouteNote, RouteSummary};

/// The service name the examples register under.
pub const SERVICE_NAME: &str = "route-guide";

/// Response metadata key naming the instance that served a call.
pub const SERVED_BY: &str = "x-served-by";

/// The features shipped with the example.
pub fn load_features() -> Vec<Feature> {
    #[derive(serde::Deserialize)]
    struct Location {
        latitude: i32,
        longitude: i32,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        name: String,
        location: Location,
    }
    let entries: Vec<Entry> =
        serde_json::from_str(include_str!("../data/route_guide_db.json")).unwrap_or_default();
    entries
        .into_iter()
        .map(|e| Feature {
            name: e.name,
            location: Some(Point {
                latitude: e.location.latitude,
                longitude: e.location.longitude,
            }),
        })
        .collect()
}

/// Notes received by RouteChat, by location.
type Notes = HashMap<(i32, i32), Vec<RouteNote>>;

/// The RouteGuide implementation.
#[derive(Debug, Clone)]
pub struct RouteGuideService {
    features: Arc<Vec<Feature>>,
    notes: Arc<Mutex<Notes>>,
    name: Arc<str>,
}

impl RouteGuideService {
    /// A service over the shipped features that tags its responses with
    /// `name` in the [`SERVED_BY`] metadata.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            features: Arc::new(load_features()),
            notes: Arc::default(),
            name: Arc::from(name.into()),
        }
    }

    /// The generated server around this implementation.
    pub fn into_server(self) -> RouteGuideServer<Self> {
        RouteGuideServer::new(self)
    }

    fn respond<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        if let Ok(value) = self.name.parse() {
            response.metadata_mut().insert(SERVED_BY, value);
        }
        response
    }

    fn feature_at(&self, point: &Point) -> Option<&Feature> {
        self.features
            .iter()
            .find(|f| f.location.as_ref() == Some(point))
    }
}

/// Whether `point` lies inside `rect` (its corners may come in any order).
pub fn in_range(point: &Point, rect: &Rectangle) -> bool {
    let (Some(lo), Some(hi)) = (&rect.lo, &rect.hi) else {
        return false;
    };
    let (left, right) = (
        lo.longitude.min(hi.longitude),
        lo.longitude.max(hi.longitude),
    );
    let (bottom, top) = (lo.latitude.min(hi.latitude), lo.latitude.max(hi.latitude));
    (left..=right).contains(&point.longitude) && (bottom..=top).contains(&point.latitude)
}

/// Great-circle distance between two points, in metres (haversine formula).
pub fn distance(a: &Point, b: &Point) -> i32 {
    const CORD_FACTOR: f64 = 1e7;
    const R: f64 = 6_371_000.0;
    let lat1 = (f64::from(a.latitude) / CORD_FACTOR).to_radians();
    let lat2 = (f64::from(b.latitude) / CORD_FACTOR).to_radians();
    let dlat = lat2 - lat1;
    let dlon = (f64::from(b.longitude - a.longitude) / CORD_FACTOR).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    let c = 2.0 * h.sqrt().atan2((1.0 - h).sqrt());
    (R * c) as i32
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[lodestar::async_trait]
impl RouteGuide for RouteGuideService {
    async fn get_feature(&self, request: Request<Point>) -> Result<Response<Feature>, Status> {
        let point = request.into_inner();
        let feature = self.feature_at(&point).cloned().unwrap_or(Feature {
            name: String::new(),
            location: Some(point),
        });
        Ok(self.respond(feature))
    }

    type ListFeaturesStream = BoxStream<Feature>;

    async fn list_features(
        &self,
        request: Request<Rectangle>,
    ) -> Result<Response<Self::ListFeaturesStream>, Status> {
        let rect = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let features = self.features.clone();
        tokio::spawn(async move {
            for feature in features.iter() {
                if feature
                    .location
                    .as_ref()
                    .is_some_and(|p| in_range(p, &rect))
                    && tx.send(Ok(feature.clone())).await.is_err()
                {
                    return; // the caller went away
                }
            }
        });
        Ok(self.respond(Box::pin(ReceiverStream::new(rx)) as Self::ListFeaturesStream))
    }

    async fn record_route(
        &self,
        request: Request<Streaming<Point>>,
    ) -> Result<Response<RouteSummary>, Status> {
        let mut points = request.into_inner();
        let started = Instant::now();
        let mut summary = RouteSummary::default();
        let mut last: Option<Point> = None;
        while let Some(point) = points.next().await {
            let point = point?;
            summary.point_count += 1;
            if self.feature_at(&point).is_some_and(|f| !f.name.is_empty()) {
                summary.feature_count += 1;
            }
            if let Some(last) = &last {
                summary.distance += distance(last, &point);
            }
            last = Some(point);
        }
        summary.elapsed_time = i32::try_from(started.elapsed().as_secs()).unwrap_or(i32::MAX);
        Ok(self.respond(summary))
    }

    type RouteChatStream = BoxStream<RouteNote>;

    async fn route_chat(
        &self,
        request: Request<Streaming<RouteNote>>,
    ) -> Result<Response<Self::RouteChatStream>, Status> {
        let mut incoming = request.into_inner();
        let notes = self.notes.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(note) = incoming.next().await {
                let note = match note {
                    Ok(note) => note,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let location = note.location.unwrap_or_default();
                let earlier = {
                    let mut notes = notes.lock().unwrap_or_else(|e| e.into_inner());
                    let at = notes
                        .entry((location.latitude, location.longitude))
                        .or_default();
                    let earlier = at.clone();
                    at.push(note);
                    earlier
                };
                for note in earlier {
                    if tx.send(Ok(note)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(self.respond(Box::pin(ReceiverStream::new(rx)) as Self::RouteChatStream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ships_its_own_features_inside_the_box() {
        let features = load_features();
        assert_eq!(features.len(), 100);
        for f in &features {
            let p = f.location.as_ref().unwrap();
            assert!((400_000_000..=420_000_000).contains(&p.latitude), "{f:?}");
            assert!(
                (-750_000_000..=-730_000_000).contains(&p.longitude),
                "{f:?}"
            );
        }
        assert!(features.iter().any(|f| f.name.is_empty()));
    }

    #[test]
    fn rectangle_corners_may_come_in_any_order() {
        let p = Point {
            latitude: 5,
            longitude: 5,
        };
        let r = |a: (i32, i32), b: (i32, i32)| Rectangle {
            lo: Some(Point {
                latitude: a.0,
                longitude: a.1,
            }),
            hi: Some(Point {
                latitude: b.0,
                longitude: b.1,
            }),
        };
        assert!(in_range(&p, &r((0, 0), (10, 10))));
        assert!(in_range(&p, &r((10, 10), (0, 0))));
        assert!(!in_range(&p, &r((6, 0), (10, 10))));
    }

    #[test]
    fn distance_is_about_right() {
        // One degree of latitude is about 111 km.
        let a = Point {
            latitude: 400_000_000,
            longitude: -740_000_000,
        };
        let b = Point {
            latitude: 410_000_000,
            longitude: -740_000_000,
        };
        let d = distance(&a, &b);
        assert!((110_000..112_500).contains(&d), "{d}");
    }
}
