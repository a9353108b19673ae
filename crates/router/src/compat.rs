//! Which prefill and decode instances can be paired: the KV frame a prefill instance pushes must
//! have the layer count the decode instance caches (an MTP layer, `engine.scheduler.spec_tokens`,
//! adds one on the side that enables it). Both report it in their stats (`kv_layers`), so the
//! router rules a mismatched pair out before any request, instead of decode failing each request
//! with `kv_invalid`.
//!
//! Invariants:
//! - a pair is mismatched only when both instances reported `kv_layers` and the values differ;
//!   an instance that has not reported it (not probed yet, older version) pairs with anyone;
//! - only healthy prefill instances decide whether a decode instance can be fed: a decode instance
//!   is unpaired when healthy prefill instances exist and every one of them mismatches it.

use std::fmt;
use std::sync::Arc;

use pdserve_protocol::{ApiError, ErrorKind};

use crate::instances::{Instance, Pool};

/// A prefill and a decode instance whose KV layouts differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairMismatch {
    /// Prefill instance id.
    pub prefill: Arc<str>,
    /// KV layers the prefill instance exports.
    pub prefill_layers: u32,
    /// Decode instance id.
    pub decode: Arc<str>,
    /// KV layers the decode instance expects.
    pub decode_layers: u32,
}

impl fmt::Display for PairMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "prefill instance {} exports {} KV layers but decode instance {} expects {} \
             (engine.scheduler.spec_tokens must be set alike on both)",
            self.prefill, self.prefill_layers, self.decode, self.decode_layers
        )
    }
}

/// The mismatch of `prefill` with `decode`, if both reported their layer counts and they differ.
pub fn mismatch(prefill: &Instance, decode: &Instance) -> Option<PairMismatch> {
    let p = prefill.stats()?.kv_layers?;
    let d = decode.stats()?.kv_layers?;
    (p != d).then(|| PairMismatch {
        prefill: prefill.id.clone(),
        prefill_layers: p,
        decode: decode.id.clone(),
        decode_layers: d,
    })
}

/// Every mismatched pair of the two pools (health aside), prefill-major.
pub fn all_mismatches(prefill: &Pool, decode: &Pool) -> Vec<PairMismatch> {
    prefill
        .instances()
        .iter()
        .flat_map(|p| decode.instances().iter().filter_map(|d| mismatch(p, d)))
        .collect()
}

/// The prefill instances that cannot feed `decode`.
pub fn incompatible_prefills(prefill: &Pool, decode: &Instance) -> Vec<PairMismatch> {
    prefill
        .instances()
        .iter()
        .filter_map(|p| mismatch(p, decode))
        .collect()
}

/// Decode instances that no healthy prefill instance can feed, with the mismatches that rule
/// them out.
pub fn unpaired_decodes(prefill: &Pool, decode: &Pool) -> Vec<(Arc<str>, Vec<PairMismatch>)> {
    let healthy: Vec<&Arc<Instance>> = prefill
        .instances()
        .iter()
        .filter(|p| p.view().healthy)
        .collect();
    if healthy.is_empty() {
        return Vec::new();
    }
    decode
        .instances()
        .iter()
        .filter_map(|d| {
            let found: Vec<PairMismatch> = healthy.iter().filter_map(|p| mismatch(p, d)).collect();
            (found.len() == healthy.len()).then(|| (d.id.clone(), found))
        })
        .collect()
}

/// The client's error when no usable pair is left: 503 `kv_layout_mismatch`, naming the pairs.
pub fn unusable_error(mismatches: &[PairMismatch]) -> ApiError {
    let pairs: Vec<String> = mismatches.iter().map(ToString::to_string).collect();
    ApiError::new(
        ErrorKind::Unavailable,
        format!("no usable prefill/decode pair: {}", pairs.join("; ")),
    )
    .with_code("kv_layout_mismatch")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HealthConfig, InstanceConfig};
    use crate::policy::RoundRobin;
    use pdserve_protocol::internal::{InstanceStats, Role};

    fn pool(role: Role, layers: &[Option<u32>]) -> Pool {
        let configs: Vec<InstanceConfig> = (0..layers.len())
            .map(|i| InstanceConfig {
                id: format!("{}{i}", &role.as_str()[..1]),
                url: "http://127.0.0.1:1".into(),
                kv_addr: Some("127.0.0.1:2".into()),
            })
            .collect();
        let pool = Pool::new(role, &configs, Box::new(RoundRobin));
        for (inst, l) in pool.instances().iter().zip(layers) {
            let stats = InstanceStats {
                instance_id: inst.id.to_string(),
                role,
                running: 0,
                waiting: 0,
                kv_usage: 0.0,
                kv_blocks_free: 1,
                kv_blocks_total: 1,
                queued_prompt_tokens: 0,
                kv_addr: None,
                max_model_len: None,
                kv_layers: *l,
                sim: None,
            };
            inst.probe_succeeded(stats, &HealthConfig::default());
        }
        pool
    }

    #[test]
    fn pairs_with_different_layer_counts_are_mismatched() {
        let p = pool(Role::Prefill, &[Some(6), Some(5), None]);
        let d = pool(Role::Decode, &[Some(5)]);
        let all = all_mismatches(&p, &d);
        assert_eq!(all.len(), 1);
        assert_eq!(
            all[0].to_string(),
            "prefill instance p0 exports 6 KV layers but decode instance d0 expects 5 \
             (engine.scheduler.spec_tokens must be set alike on both)"
        );
        assert!(unpaired_decodes(&p, &d).is_empty(), "p1 and p2 can feed d0");
    }

    #[test]
    fn a_decode_instance_no_healthy_prefill_matches_is_unpaired() {
        let p = pool(Role::Prefill, &[Some(6), Some(5)]);
        let d = pool(Role::Decode, &[Some(5), Some(6)]);
        p.instances()[1].failed(&HealthConfig {
            unhealthy_after_failures: 1,
            ..HealthConfig::default()
        });
        let unpaired = unpaired_decodes(&p, &d);
        assert_eq!(unpaired.len(), 1);
        assert_eq!(&*unpaired[0].0, "d0");
        let err = unusable_error(&unpaired[0].1);
        assert_eq!(err.kind, ErrorKind::Unavailable);
        assert!(err.message.contains("p0 exports 6") && err.message.contains("d0 expects 5"));
    }
}
