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
use crate::client::policy::{MAX_OTHER_METHODS, MethodPolicy, Policy};

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
/// injector), built from the policy's `methods` and replaced with it. Each
/// method an entry names has a state of its own, and so has each method the
/// `"*"` entry covers, made on its first call (at most
/// [`MAX_OTHER_METHODS`]; the methods past that share one). With no method
/// set, a call costs one relaxed load and a branch.
pub(crate) struct PerMethod<T> {
    on: AtomicBool,
    table: ArcSwap<Table<T>>,
}

struct Table<T> {
    /// By method name (as the policy lists it): `None` for a name whose
    /// entry does not set this layer (it still hides `"*"`).
    named: HashMap<Box<str>, Option<Arc<T>>>,
    /// The `"*"` entry's, if it sets this layer.
    others: Option<Others<T>>,
}

/// Makes a method's state, given its state so far.
type Make<T> = Box<dyn Fn(Option<&Arc<T>>) -> Arc<T> + Send + Sync>;

/// The states of the methods the `"*"` entry covers.
struct Others<T> {
    /// Makes a method's state (given its state so far, to keep when the
    /// settings are unchanged).
    make: Make<T>,
    /// Those made so far, by method name.
    made: ArcSwap<HashMap<Box<str>, Arc<T>>>,
    /// Shared by the methods past [`MAX_OTHER_METHODS`].
    overflow: Arc<T>,
}

impl<T> Others<T> {
    /// The state of `name`, made now if it has none yet.
    fn state(&self, name: &str) -> Arc<T> {
        if let Some(state) = self.made.load().get(name) {
            return state.clone();
        }
        let made = self.made.rcu(|made| {
            if made.contains_key(name) || made.len() >= MAX_OTHER_METHODS {
                return Arc::clone(made);
            }
            let mut more = HashMap::clone(made);
            more.insert(Box::from(name), (self.make)(None));
            Arc::new(more)
        });
        // `rcu` returns the map it replaced: look in the one in place.
        drop(made);
        self.made
            .load()
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.overflow.clone())
    }
}

impl<T> Default for PerMethod<T> {
    fn default() -> Self {
        Self {
            on: AtomicBool::new(false),
            table: ArcSwap::from_pointee(Table {
                named: HashMap::new(),
                others: None,
            }),
        }
    }
}

impl<T> std::fmt::Debug for PerMethod<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.table.load();
        f.debug_struct("PerMethod")
            .field("named", &table.named.len())
            .field(
                "others",
                &table.others.as_ref().map(|o| o.made.load().len()),
            )
            .finish()
    }
}

impl<T: Send + Sync + 'static> PerMethod<T> {
    /// Whether any method has a state (one relaxed load).
    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// The state of the method at `path` (`/package.Service/Method`): its
    /// entry's, else its own under the `"*"` entry (as [`Policy::method`]).
    pub(crate) fn get(&self, path: &str) -> Option<Arc<T>> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let table = self.table.load();
        // The last segment: a byte search ('/' is ASCII), cheaper than `rsplit`'s.
        let name = match path.bytes().rposition(|b| b == b'/') {
            Some(slash) => path.get(slash + 1..).unwrap_or(path),
            None => path,
        };
        match table.named.get(name) {
            Some(state) => state.clone(),
            None => table.others.as_ref().map(|others| others.state(name)),
        }
    }

    /// Follows `policy`: `settings` reads an entry's settings of this
    /// layer, `make` builds a method's state (given its state so far, to
    /// keep when its settings are unchanged).
    pub(crate) fn set<S>(
        &self,
        policy: &Policy,
        settings: impl Fn(&MethodPolicy) -> Option<&S>,
        make: impl Fn(&S, Option<&Arc<T>>) -> Arc<T> + Send + Sync + 'static,
    ) where
        S: Clone + Send + Sync + 'static,
    {
        let old = self.table.load();
        let make = Arc::new(make);
        let mut named = HashMap::new();
        let mut others = None;
        for entry in &policy.methods {
            let settings = settings(entry);
            for name in &entry.names {
                if name == "*" {
                    others = settings.map(|s| {
                        let (s, make) = (s.clone(), make.clone());
                        let old = old.others.as_ref();
                        let previous =
                            |name: &str| old.and_then(|o| o.made.load().get(name).cloned());
                        let made: HashMap<Box<str>, Arc<T>> = old
                            .map(|o| o.made.load().keys().cloned().collect::<Vec<_>>())
                            .unwrap_or_default()
                            .into_iter()
                            .map(|name| {
                                let state = make(&s, previous(&name).as_ref());
                                (name, state)
                            })
                            .collect();
                        let overflow = make(&s, old.map(|o| &o.overflow));
                        Others {
                            make: Box::new(move |previous| make(&s, previous)),
                            made: ArcSwap::from_pointee(made),
                            overflow,
                        }
                    });
                    continue;
                }
                let previous = old.named.get(name.as_str()).and_then(Option::as_ref);
                let state = settings.map(|s| make(s, previous));
                named.insert(Box::from(name.as_str()), state);
            }
        }
        let on = others.is_some() || named.values().any(Option::is_some);
        self.table.store(Arc::new(Table { named, others }));
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
            move |_, _| before.clone(),
        );
        assert_eq!(get("/pkg.S/Put"), None);
    }

    #[test]
    fn each_method_under_the_default_entry_has_its_own_state_up_to_the_cap() {
        let policy = Policy::from_toml(
            r#"
            [[methods]]
            names = ["*"]
            fault = { abort_percent = 20.0 }
            "#,
        )
        .unwrap();
        let table: PerMethod<String> = PerMethod::default();
        let set = |table: &PerMethod<String>| {
            table.set(
                &policy,
                |entry| entry.fault.as_ref(),
                |settings, old| {
                    old.cloned()
                        .unwrap_or_else(|| Arc::new(settings.abort_percent.to_string()))
                },
            )
        };
        set(&table);
        let put = table.get("/pkg.S/Put").unwrap();
        let get = table.get("/pkg.S/Get").unwrap();
        assert!(!Arc::ptr_eq(&put, &get), "a state for each method");
        assert!(Arc::ptr_eq(&put, &table.get("/pkg.S/Put").unwrap()));
        // Kept across a policy with the same settings.
        set(&table);
        assert!(Arc::ptr_eq(&put, &table.get("/pkg.S/Put").unwrap()));
        // Past the cap, the methods share one.
        for n in 0..MAX_OTHER_METHODS {
            table.get(&format!("/pkg.S/M{n}"));
        }
        let late = table.get("/pkg.S/Late").unwrap();
        assert!(Arc::ptr_eq(&late, &table.get("/pkg.S/Later").unwrap()));
        assert!(Arc::ptr_eq(&put, &table.get("/pkg.S/Put").unwrap()));
    }
}
