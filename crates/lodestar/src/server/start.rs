//! Starting a service: the routes (the services added, health and
//! reflection), the server stack, the listener, subscriptions and the
//! first registration.

use std::sync::Arc;
use std::time::Duration;

use lodestar_core::RegistryError;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic_health::ServingStatus;

use super::connection::{self, Connections};
use super::lifecycle::{Announcer, Lifecycle};
use super::registration::Registration;
use super::{RunningService, ServeError, ServiceBuilder, shutdown_signal, stack};
use crate::codec::Descriptors;
use lodestar_core::registry::KeepRegistered;

impl ServiceBuilder {
    /// Binds, starts serving, and registers. Returns once the listener is
    /// bound and the first registration attempt has finished (it waits at
    /// most the TTL or 5 s, whichever is less); if that attempt failed, the
    /// service serves anyway and registers in the background as soon as the
    /// registry can be reached.
    ///
    /// First, unless [`telemetry`](Self::telemetry) is off, it installs
    /// lodestar's logs and traces from the environment, if the process has
    /// no `tracing` subscriber yet ([`telemetry`](crate::telemetry)).
    pub async fn start(mut self) -> Result<RunningService, ServeError> {
        if self.telemetry {
            crate::telemetry::install(&self.instance.key.service, self.telemetry_settings.take());
        }
        let builtin = [
            <tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> as NamedService>::NAME,
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        let limits = &self.connections;
        if limits.max_connections == 0 || limits.stall_timeout.is_zero() {
            return Err(ServeError::Setting(format!(
                "ConnectionLimits::max_connections ({}) and stall_timeout ({:?}) must be above zero",
                limits.max_connections, limits.stall_timeout
            )));
        }
        if let Some(heartbeat) = self.heartbeat
            && heartbeat >= self.ttl
        {
            return Err(ServeError::Setting(format!(
                "the heartbeat interval ({heartbeat:?}) must be shorter than the TTL ({:?}), \
                 or every lease lapses between beats; a third of the TTL is the default",
                self.ttl
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for name in builtin.iter().chain(&self.names) {
            if !seen.insert(*name) {
                return Err(ServeError::DuplicateService(name));
            }
        }
        let listener = tokio::net::TcpListener::bind(self.bind)
            .await
            .map_err(|source| ServeError::Bind {
                address: self.bind,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
            address: self.bind,
            source,
        })?;

        let mut instance = self.instance;
        instance.address = match self.advertise {
            Some(address) => address,
            None if local_addr.ip().is_unspecified() => format!("127.0.0.1:{}", local_addr.port()),
            None => local_addr.to_string(),
        };
        instance.id = self.id.unwrap_or_else(|| {
            format!(
                "{}-{:012x}",
                instance.key.service,
                fastrand::u64(..) & 0xffff_ffff_ffff
            )
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::Serving).await;
        for name in &self.names {
            health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }

        // Both reflection versions list every service, themselves included.
        let mut descriptors = vec![
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        for descriptor in &self.descriptors {
            if !descriptors.iter().any(|d| std::ptr::eq(*d, *descriptor)) {
                descriptors.push(descriptor);
            }
        }
        let reflection = || {
            descriptors
                .iter()
                .fold(tonic_reflection::server::Builder::configure(), |b, d| {
                    b.register_encoded_file_descriptor_set(d)
                })
        };
        let known = Descriptors::from_sets(&descriptors).map_err(|e| {
            ServeError::Reflection(format!("the services' descriptors do not load: {e}"))
        })?;
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;

        let served: Vec<&str> = builtin.iter().chain(&self.names).copied().collect();
        let methods = self.metrics.as_ref().map(|metrics| {
            let methods = known.methods(&served).map(|(path, client, server)| {
                (path, crate::metrics::rpc::Kind::of(client, server))
            });
            crate::metrics::rpc::MethodTable::server(metrics, methods)
        });

        let observers = match (&self.metrics, &methods) {
            (Some(metrics), Some(methods)) => {
                self.observers
                    .with(crate::metrics::governance::ServerGovernance::new(
                        metrics,
                        methods.clone(),
                    ))
            }
            _ => self.observers,
        };

        // REST routes from the served methods' `google.api.http` options,
        // checked now: a bad template stops the start, naming it.
        let rest = if self.web.rest {
            let routes = crate::server::web::rest::Routes::build(&known, &served)
                .map_err(|e| ServeError::RestRoute(e.to_string()))?;
            (!routes.is_empty()).then_some(routes)
        } else {
            None
        };

        let mut routes = stack::RouterBuilder::default();
        for add in self.services {
            add(&mut routes, &self.limits);
        }
        routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let routes = routes.build();

        let events = Arc::new(Announcer::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        // Replaced whole by `RunningService::set_policy`.
        let faults = stack::fault::Live::new(&self.policy);
        let policy = Arc::new(arc_swap::ArcSwap::from_pointee(self.policy));
        let stack = stack::Stack::build(
            routes,
            stack::Settings {
                limits: self.limits,
                send_compressed: self.send_compressed,
                inspect_compression: self.inspect_compression,
                descriptors: known,
                policy: policy.clone(),
                observers,
                faults: faults.clone(),
                methods,
            },
            self.layers,
            self.web.clone(),
            rest,
        );
        let admission = stack.admission();
        let serve = tokio::spawn(connection::serve(
            listener,
            stack,
            stop_rx,
            self.grace,
            events.clone(),
            Connections {
                // HTTP/1.1 is offered by ALPN beside h2 when a web protocol is on.
                tls: self
                    .tls
                    .as_ref()
                    .map(|tls| tls.acceptor_for(self.web.serves_http1())),
                http1: self.web.serves_http1(),
                http2: self.http2,
                limits: self.connections,
            },
        ));
        events.announce(Lifecycle::Serving(local_addr));
        let admin = match self.admin {
            None => None,
            Some(address) => {
                let admin_listener =
                    tokio::net::TcpListener::bind(address)
                        .await
                        .map_err(|source| {
                            serve.abort();
                            ServeError::AdminBind { address, source }
                        })?;
                let admin_addr = admin_listener.local_addr().map_err(|source| {
                    serve.abort();
                    ServeError::AdminBind { address, source }
                })?;
                let state = Arc::new(crate::admin::State {
                    metrics: self.metrics.clone(),
                    events: events.clone(),
                    registers: self.registry.is_some(),
                });
                let (stop, stopped) = watch::channel(false);
                let task = tokio::spawn(crate::admin::serve(
                    admin_listener,
                    state,
                    crate::admin::Bounds::DEFAULT,
                    stopped,
                ));
                tracing::info!(service = %instance.key, address = %admin_addr,
                    "metrics at http://{admin_addr}/metrics");
                Some(super::running::Admin {
                    address: admin_addr,
                    stop,
                    task,
                })
            }
        };

        // Subscribe before registering, so that a service found through the
        // registry is already handling its events.
        let (subscribers_stop, subscribers_stopped) = watch::channel(false);
        let mut subscriber_tasks = Vec::new();
        if !self.subscribers.is_empty() {
            let Some(broker) = &self.broker else {
                serve.abort();
                return Err(ServeError::Subscribe {
                    topic: self.subscribers[0].topic.clone(),
                    source: crate::BrokerError::Invalid(
                        "the service has subscribers but no broker (ServiceBuilder::broker)"
                            .to_owned(),
                    ),
                });
            };
            for subscriber in self.subscribers {
                let subscription = match broker
                    .subscribe(&subscriber.topic, subscriber.options.clone())
                    .await
                {
                    Ok(subscription) => subscription,
                    Err(source) => {
                        let _ = subscribers_stop.send(true);
                        serve.abort();
                        return Err(ServeError::Subscribe {
                            topic: subscriber.topic,
                            source,
                        });
                    }
                };
                subscriber_tasks.push(tokio::spawn(crate::events::run_subscriber(
                    subscription,
                    subscriber.handler,
                    subscribers_stopped.clone(),
                    self.metrics.clone(),
                )));
            }
        }

        let registration = match self.registry {
            None => None,
            Some(registry) => {
                // Try once before returning, so that a started service is
                // findable; if the registry is down, keep trying in the background.
                let first = tokio::time::timeout(
                    self.ttl.min(Duration::from_secs(5)),
                    registry.register(instance.clone(), self.ttl),
                )
                .await;
                let registered = match first {
                    Ok(Ok(())) => {
                        tracing::info!(service = %instance.key, instance = %instance.id, address = %instance.address, "registered");
                        events.announce(Lifecycle::Registered);
                        true
                    }
                    Ok(Err(source @ RegistryError::Invalid(_))) => {
                        let _ = subscribers_stop.send(true);
                        serve.abort();
                        return Err(ServeError::Registration {
                            instance: instance.id,
                            source,
                        });
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(service = %instance.key, ?registry, error = %e,
                            "waiting for the registry: serving anyway, and registering as soon as it answers");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(service = %instance.key, ?registry,
                            "waiting for the registry (no answer): serving anyway, and registering as soon as it answers");
                        false
                    }
                };
                // Heartbeats every third of the TTL unless set otherwise
                // (at least KeepRegistered's MIN_HEARTBEAT_INTERVAL).
                let keep = KeepRegistered::new(registry.clone(), instance.clone(), self.ttl)
                    .interval(self.heartbeat.unwrap_or(self.ttl / 3))
                    .already_registered(registered);
                let (announcer, registered) = (events.clone(), instance.clone());
                let task = tokio::spawn(keep.run(move || {
                    tracing::info!(service = %registered.key, instance = %registered.id,
                        address = %registered.address, "registered");
                    announcer.announce(Lifecycle::Registered);
                }));
                Some(Registration { registry, task })
            }
        };
        tracing::info!(service = %instance.key, instance = %instance.id, address = %local_addr,
            "serving {}", self.names.join(", "));

        Ok(RunningService {
            local_addr,
            instance,
            health,
            names: self.names,
            registration,
            stop: stop_tx,
            serve,
            events,
            subscribers_stop,
            subscriber_tasks,
            grace: self.grace,
            policy,
            faults,
            admission,
            admin,
        })
    }

    /// Starts, then runs until SIGINT or SIGTERM, then shuts down gracefully.
    /// The signal handlers are installed before starting, so a signal that
    /// arrives during startup is not lost.
    pub async fn run(self) -> Result<(), ServeError> {
        let signal = shutdown_signal();
        self.run_until(signal).await
    }

    /// Starts, then runs until `signal` completes, then shuts down gracefully.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let running = self.start().await?;
        signal.await;
        running.shutdown().await
    }
}
