//! The URLs that name a registry or a broker (`lodestar://`, `etcd://`,
//! `nats://`, `http://`, `memory://`), as users and environment variables
//! give them: parsed without connecting anywhere.
//!
//! Input: the URL. Besides not crashing, errors and `Debug` output never
//! show a token or password: each is replaced by a sentinel and the output
//! searched for it.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

const SECRET: &str = "S3NT1NEL";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// `url` with the value of every `token=` and `password=` parameter (as
/// the registry and etcd parsers read them) replaced by [`SECRET`].
fn with_sentinels(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret(name) => format!("{name}={SECRET}"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

fn is_secret(name: &str) -> bool {
    let decoded: String = form_urlencoded::parse(format!("{name}=").as_bytes())
        .map(|(name, _)| name.into_owned())
        .collect();
    matches!(name, "token" | "password") || matches!(decoded.as_str(), "token" | "password")
}

/// Whether parsing `url` as an etcd URL reads a file (`ca=`): not what a
/// fuzz target should do with random paths.
fn reads_files(url: &str) -> bool {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(query.as_bytes()).any(|(name, _)| name == "ca")
}

fuzz_target!(|input: &[u8]| {
    let Ok(url) = std::str::from_utf8(input) else {
        return;
    };
    let _runtime = runtime().enter();

    if let Ok(addresses) = lodestar::parse_host_ports(url) {
        for address in addresses {
            let (host, port) = address.rsplit_once(':').expect("host:port");
            assert!(!host.is_empty() && port.parse::<u16>().is_ok(), "{address}");
        }
    }

    // Inputs that hold the sentinel themselves (libFuzzer learns it from
    // the comparisons) cannot tell a leak from an echo.
    if !reads_files(url) && !url.contains(SECRET) {
        let url = with_sentinels(url);
        match lodestar_registry::from_url(&url) {
            Ok(registry) => {
                let shown = format!("{registry:?}");
                assert!(!shown.contains(SECRET), "{shown}");
            }
            Err(error) => {
                let shown = format!("{error} {error:?}");
                assert!(
                    !shown.contains(SECRET),
                    "the registry URL error shows a secret: {shown}"
                );
            }
        }
        match lodestar_etcd::EtcdConfig::from_url(&url) {
            Ok(config) => {
                let shown = format!("{config:?}");
                assert!(!shown.contains(SECRET), "{shown}");
                assert!(!config.endpoints.is_empty());
            }
            Err(error) => assert!(
                !error.contains(SECRET),
                "the etcd URL error shows a secret: {error}"
            ),
        }
    }

    if let Ok((servers, shown)) = lodestar_broker::fuzzing::nats_servers(url) {
        assert_eq!(servers, shown.split(',').count());
        assert!(
            !shown.contains('@'),
            "the shown hosts keep credentials: {shown}"
        );
    }
    // What precedes a host's last `@` is credentials: with each replaced by
    // the sentinel, neither errors nor the shown hosts repeat them.
    if let Some(hosts) = url.strip_prefix("nats://")
        && !url.contains(SECRET)
    {
        let hosts: Vec<String> = hosts
            .split(',')
            .map(|host| match host.trim().rsplit_once('@') {
                Some((_, address)) => format!("{SECRET}:{SECRET}@{address}"),
                None => host.to_owned(),
            })
            .collect();
        let shown =
            match lodestar_broker::fuzzing::nats_servers(&format!("nats://{}", hosts.join(","))) {
                Ok((_, shown)) => shown,
                Err(error) => error.to_string(),
            };
        assert!(
            !shown.contains(SECRET),
            "the nats URL shows credentials: {shown}"
        );
    }

    if !url.starts_with("nats://") {
        let registry: Arc<dyn lodestar::Registry> = Arc::new(lodestar::MemoryRegistry::new());
        // memory:// and http:// take no credentials: nothing to hide here.
        let _ = runtime().block_on(lodestar_broker::from_url(url, registry));
    }
});
