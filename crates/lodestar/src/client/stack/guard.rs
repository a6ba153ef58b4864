//! What the layers above retry share: their state per method, replaced
//! with the policy, and the future that holds a call's permit until its
//! response comes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::Response;
use tonic::Status;

use crate::client::observe::{Observed, Reporter};
use crate::client::policy::{MethodPolicy, Policy};

/// A layer above retry (the bulkhead, breaker and fault layers): its
/// state, shared by the channel and replaced with the policy; who is told
/// of its decisions; and the layers below it.
#[derive(Debug)]
pub(crate) struct Guarded<L, S> {
    pub(super) live: Arc<L>,
    pub(super) reporter: Reporter,
    pub(super) inner: S,
}

impl<L, S> Guarded<L, S> {
    pub(crate) fn new(live: Arc<L>, reporter: Reporter, inner: S) -> Self {
        Self {
            live,
            reporter,
            inner,
        }
    }
}

/// A layer's state for each method with settings (a breaker, a fault
/// injector), built from the policy's `methods` and replaced with it.
/// With no method set, a call costs one relaxed load and a branch.
#[derive(Debug)]
pub(crate) struct PerMethod<T> {
    on: AtomicBool,
    /// By method name (as the policy lists it): `None` for a name whose
    /// entry does not set this layer (it still hides `"*"`).
    table: ArcSwap<HashMap<Box<str>, Option<Arc<T>>>>,
}

impl<T> Default for PerMethod<T> {
    fn default() -> Self {
        Self {
            on: AtomicBool::new(false),
            table: ArcSwap::default(),
        }
    }
}

impl<T> PerMethod<T> {
    /// The state of the method at `path` (`/package.Service/Method`): its
    /// entry's, else the `"*"` entry's (as [`Policy::method`]).
    pub(crate) fn get(&self, path: &str) -> Option<Arc<T>> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let table = self.table.load();
        let name = path.rsplit('/').next().unwrap_or(path);
        match table.get(name) {
            Some(state) => state.clone(),
            None => table.get("*").cloned().flatten(),
        }
    }

    /// Follows `policy`: `settings` reads an entry's settings of this
    /// layer, `make` builds a name's state (given its state so far, to
    /// keep when its settings are unchanged).
    pub(crate) fn set<S>(
        &self,
        policy: &Policy,
        settings: impl Fn(&MethodPolicy) -> Option<&S>,
        make: impl Fn(&S, Option<&Arc<T>>) -> Arc<T>,
    ) {
        let old = self.table.load();
        let mut table = HashMap::new();
        for entry in &policy.methods {
            let settings = settings(entry);
            for name in &entry.names {
                let previous = old.get(name.as_str()).and_then(Option::as_ref);
                let state = settings.map(|s| make(s, previous));
                table.insert(Box::from(name.as_str()), state);
            }
        }
        let on = table.values().any(Option::is_some);
        self.table.store(Arc::new(table));
        self.on.store(on, Ordering::Relaxed);
    }
}

/// What a layer holds for a call until its response comes.
pub(crate) trait Hold {
    /// The response came: keep the permit in its body until it ends.
    fn hold(self, response: &mut Response<Observed>);
    /// The call failed with `status`.
    fn failed(self, status: &Status);
}

pin_project_lite::pin_project! {
    /// The inner layers' future, and the permit of the call.
    pub(crate) struct Holding<F, P> {
        #[pin]
        pub(crate) inner: F,
        pub(crate) permit: Option<P>,
    }
}

impl<F, P> Future for Holding<F, P>
where
    F: Future<Output = Result<Response<Observed>, Status>>,
    P: Hold,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = std::task::ready!(this.inner.poll(cx));
        if let Some(permit) = this.permit.take() {
            match &mut result {
                Ok(response) => permit.hold(response),
                Err(status) => permit.failed(status),
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_takes_its_entry_else_the_default_and_an_entry_without_settings_hides_it() {
        let policy = Policy::from_toml(
            r#"
            [[methods]]
            names = ["Quiet"]
            [[methods]]
            names = ["Get", "List"]
            fault = { abort_percent = 10.0 }
            [[methods]]
            names = ["*"]
            fault = { abort_percent = 20.0 }
            "#,
        )
        .unwrap();
        let table: PerMethod<String> = PerMethod::default();
        assert_eq!(table.get("/pkg.S/Get"), None, "off until set");
        table.set(
            &policy,
            |entry| entry.fault.as_ref(),
            |settings, _| Arc::new(settings.abort_percent.to_string()),
        );
        let get = |path| table.get(path).map(|s| s.as_str().to_owned());
        assert_eq!(get("/pkg.S/Get").as_deref(), Some("10"));
        assert_eq!(get("/pkg.S/List").as_deref(), Some("10"));
        assert_eq!(get("/pkg.S/Put").as_deref(), Some("20"));
        assert_eq!(get("/pkg.S/Quiet"), None);
        // Kept across a change when `make` says so.
        let before = table.get("/pkg.S/Get").unwrap();
        table.set(
            &policy,
            |entry| entry.fault.as_ref(),
            |settings, old| {
                old.cloned()
                    .unwrap_or_else(|| Arc::new(settings.abort_percent.to_string()))
            },
        );
        assert!(Arc::ptr_eq(&before, &table.get("/pkg.S/Get").unwrap()));
        table.set(
            &Policy::default(),
            |entry| entry.fault.as_ref(),
            |_, _| before.clone(),
        );
        assert_eq!(get("/pkg.S/Put"), None);
    }
}
