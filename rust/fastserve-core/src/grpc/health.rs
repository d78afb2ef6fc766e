//! `grpc.health.v1.Health` (Check and Watch) on the gRPC port, for Kubernetes gRPC probes and
//! load balancers. Service `""` is the server: SERVING once ready (the startup loads finished,
//! not draining, every model version loaded, as `/v2/health/ready`), else NOT_SERVING. Each
//! model's name is a service too: SERVING while one of its versions is ready. A model that is
//! removed is forgotten (NOT_FOUND, as for a model never served).
//!
//! The statuses live in `tonic-health`'s reporter and follow the server's state: the registry
//! signals every change of the models and of the server's lifecycle; a slow periodic refresh also
//! catches what happens inside a model (instances that stop).
//!
//! Watch streams end once the server drains, right after they said NOT_SERVING: a client that
//! watches (gRPC client-side health checking) would otherwise hold its connection open, and the
//! shutdown with it, until the drain timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::server::state::ServerState;

/// How often the statuses are recomputed without a change signal.
const REFRESH: Duration = Duration::from_secs(1);

/// The status of every service name now: `""` and each model's name.
pub fn statuses(state: &ServerState) -> HashMap<String, ServingStatus> {
    let status = |ok: bool| if ok { ServingStatus::Serving } else { ServingStatus::NotServing };
    let draining = state.is_draining();
    let mut out: HashMap<String, ServingStatus> = state
        .registry
        .models()
        .into_iter()
        .map(|(name, entry)| (name, status(!draining && entry.versions.values().any(|v| v.is_ready()))))
        .collect();
    out.insert(String::new(), status(state.is_ready()));
    out
}

/// The health service of a gRPC listener, kept in step with `state` by a task that ends when
/// `shutdown` flips. The server reads NOT_SERVING until the task first looked at the state.
pub async fn service(state: Arc<ServerState>, shutdown: watch::Receiver<bool>) -> HealthServer<impl Health> {
    let reporter = HealthReporter::new();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    let inner = HealthService::from_health_reporter(reporter.clone());
    tokio::spawn(follow(state, reporter, shutdown.clone()));
    HealthServer::new(Draining { inner, shutdown })
}

/// The health service, its Watch streams ended by the drain (see the module's notes).
struct Draining {
    inner: HealthService,
    shutdown: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Health for Draining {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let mut statuses = self.inner.watch(request).await?.into_inner();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let (mut last, mut draining) = (None, false);
            loop {
                tokio::select! {
                    next = statuses.next() => {
                        let Some(next) = next else { return };
                        let status = next.as_ref().ok().map(|r| r.status);
                        // The reporter may set a status again unchanged: watchers hear changes only.
                        if status.is_none() || status != last {
                            last = status;
                            if tx.send(next).await.is_err() {
                                return;
                            }
                        }
                    }
                    _ = async { shutdown.wait_for(|&s| s).await.map(|_| ()) }, if !draining => draining = true,
                    _ = tx.closed() => return,
                }
                if draining && last == Some(WireStatus::NotServing as i32) {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Keeps `reporter` in step with `state` until `shutdown` flips; only changes are reported, so a
/// Watch stream sees each transition once.
async fn follow(state: Arc<ServerState>, mut reporter: HealthReporter, mut shutdown: watch::Receiver<bool>) {
    let mut known: HashMap<String, ServingStatus> = HashMap::from([(String::new(), ServingStatus::NotServing)]);
    let mut changes = state.registry.watch_changes();
    loop {
        let now = statuses(&state);
        for (name, status) in &now {
            if known.get(name) != Some(status) {
                reporter.set_service_status(name, *status).await;
            }
        }
        for gone in known.keys().filter(|name| !now.contains_key(*name)) {
            reporter.clear_service_status(gone).await;
        }
        known = now;
        let stop = tokio::select! {
            _ = changes.changed() => false,
            _ = tokio::time::sleep(REFRESH) => false,
            _ = shutdown.wait_for(|&s| s) => true,
        };
        if stop {
            // Draining: say so to the watchers of every service before the listener closes.
            for (name, _) in known.iter().filter(|(_, status)| **status != ServingStatus::NotServing) {
                reporter.set_service_status(name, ServingStatus::NotServing).await;
            }
            return;
        }
    }
}
