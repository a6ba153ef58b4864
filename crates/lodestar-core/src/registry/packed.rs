//! [`Packed`]: an [`Instance`] as [`MemoryRegistry`](super::memory::MemoryRegistry)
//! keeps it, in a fraction of the memory.
//!
//! An `Instance` is a dozen separate allocations: each string, and a
//! `BTreeMap` whose first node alone holds room for eleven labels. A
//! registry holding a hundred thousand of them spends most of its memory
//! on that. `Packed` keeps every string of an instance back to back in one
//! allocation (plus one small one for the label boundaries, when there are
//! labels), and leaves out the id and the service key, which the maps that
//! hold it already know.

use std::collections::BTreeMap;

use crate::{Instance, ServiceKey};

/// An instance without its id and service key, its strings in one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Packed {
    /// Version, address, protocol and zone, then each label's key and
    /// value, back to back.
    text: Box<str>,
    /// Where version, address, protocol and zone end in `text`.
    fixed: [u32; 4],
    /// Where each label key and value ends in `text` (keys at even indices).
    labels: Box<[u32]>,
    weight: u32,
    /// Whether it is healthy (see [`Instance::healthy`]).
    pub(super) healthy: bool,
    /// Whether operators allow traffic to it (see [`Instance::enabled`]).
    pub(super) enabled: bool,
    ephemeral: bool,
}

impl Packed {
    /// Packs everything but the id and the service key; `None` if the
    /// instance's strings add up to 4 GiB or more.
    pub(super) fn new(instance: &Instance) -> Option<Self> {
        let fixed_len = instance.version.len()
            + instance.address.len()
            + instance.protocol.len()
            + instance.zone.len();
        let labels_len: usize = instance
            .metadata
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        let mut text = String::with_capacity(fixed_len + labels_len);
        let end = |text: &mut String, s: &str| {
            text.push_str(s);
            u32::try_from(text.len()).ok()
        };
        let fixed = [
            end(&mut text, &instance.version)?,
            end(&mut text, &instance.address)?,
            end(&mut text, &instance.protocol)?,
            end(&mut text, &instance.zone)?,
        ];
        let mut labels = Vec::with_capacity(instance.metadata.len() * 2);
        for (key, value) in &instance.metadata {
            labels.push(end(&mut text, key)?);
            labels.push(end(&mut text, value)?);
        }
        Some(Self {
            text: text.into_boxed_str(),
            fixed,
            labels: labels.into_boxed_slice(),
            weight: instance.weight,
            healthy: instance.healthy,
            enabled: instance.enabled,
            ephemeral: instance.ephemeral,
        })
    }

    /// The string between two offsets (empty if they are out of range,
    /// which [`Packed::new`] never makes them).
    fn slice(&self, start: u32, end: u32) -> &str {
        let (start, end) = (start as usize, end as usize);
        self.text.get(start..end).unwrap_or_default()
    }

    /// The `n`th of version, address, protocol and zone.
    fn field(&self, n: usize) -> &str {
        let start = n.checked_sub(1).map_or(0, |p| self.fixed[p]);
        self.slice(start, self.fixed[n])
    }

    /// The bytes it holds on the heap, and itself: what keeping a copy costs.
    pub(super) fn footprint(&self) -> usize {
        std::mem::size_of::<Self>() + self.text.len() + self.labels.len() * 4
    }

    /// The address (`host:port`).
    pub(super) fn address(&self) -> &str {
        self.field(1)
    }

    /// The labels, in key order.
    fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut start = self.fixed[3];
        self.labels.chunks_exact(2).map(move |ends| {
            let key = self.slice(start, ends[0]);
            let value = self.slice(ends[0], ends[1]);
            start = ends[1];
            (key, value)
        })
    }

    /// The instance again, with its id and service key.
    pub(super) fn unpack(&self, key: &ServiceKey, id: &str) -> Instance {
        let metadata: BTreeMap<String, String> = self
            .labels()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Instance {
            id: id.to_owned(),
            key: key.clone(),
            version: self.field(0).to_owned(),
            address: self.address().to_owned(),
            protocol: self.field(2).to_owned(),
            metadata,
            weight: self.weight,
            zone: self.field(3).to_owned(),
            healthy: self.healthy,
            enabled: self.enabled,
            ephemeral: self.ephemeral,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacking_gives_back_the_instance() {
        let full = Instance::new("orders", "10.0.0.7:8080")
            .with_service_key(ServiceKey::new("orders").with_namespace("staging"))
            .with_id("orders-a")
            .with_version("1.2.3")
            .with_protocol("http")
            .with_zone("eu-west-1a")
            .with_weight(7)
            .with_label("canary", "true")
            .with_label("commit", "abc1234")
            .with_label("", "empty key");
        let mut unhealthy = Instance::new("x", "h:1");
        unhealthy.healthy = false;
        unhealthy.enabled = false;
        unhealthy.ephemeral = false;
        let mut blank = Instance::new("x", "");
        blank.protocol.clear();
        for instance in [full, unhealthy, blank] {
            let packed = Packed::new(&instance).unwrap();
            assert_eq!(packed.unpack(&instance.key, &instance.id), instance);
            assert_eq!(packed.address(), instance.address);
        }
    }

    #[test]
    fn equal_instances_pack_equal_and_different_ones_do_not() {
        let a = Instance::new("svc", "h:1").with_label("k", "v");
        let same = Instance::new("svc", "h:1").with_label("k", "v");
        // The same strings, split differently between key and value.
        let moved = Instance::new("svc", "h:1").with_label("kv", "");
        assert_eq!(Packed::new(&a), Packed::new(&same));
        assert_ne!(Packed::new(&a), Packed::new(&moved));
        assert_ne!(Packed::new(&a), Packed::new(&a.clone().with_weight(1)));
    }
}
