//! Where a service's routed experts run: [`ServiceExperts`], every expert in this process
//! ([`LocalExperts`]) or an expert-parallel group ([`EpGroup`]: `D` ranks each owning its experts,
//! token rows dispatched to them and combined back through the EP transport, EPLB).
//!
//! The choice is configuration (`[sim] prefill_ep_runtime` / `decode_ep_runtime`, see
//! [`super::SimSection`]); both give the same tokens (the EP result equals the single-process
//! model within 1e-5). With the EP runtime, each step's [`StepRouting`](pdserve_engine::StepRouting)
//! carries the placement the step ran with and the GPU that served every (token, expert) pair, and
//! the fabric clock prices exactly those; with local experts the clock uses its own placement.

use candle_core::Tensor;
use pdserve_engine::ExpertBackend;
use pdserve_ep::EpGroup;
use pdserve_fabric::ExpertPlacement;
use pdserve_model::{LocalExperts, ModelError, MoeExperts, Routing};

/// The routed experts of one instance; see the module docs.
#[derive(Debug)]
pub enum ServiceExperts {
    /// Every routed expert in this process.
    Local(LocalExperts),
    /// The expert-parallel runtime (boxed: it holds the ranks and their traffic state).
    Ep(Box<EpGroup>),
}

impl ServiceExperts {
    /// The EP group, when the experts run on the EP runtime.
    pub fn ep_group(&self) -> Option<&EpGroup> {
        match self {
            Self::Local(_) => None,
            Self::Ep(group) => Some(group),
        }
    }
}

impl MoeExperts for ServiceExperts {
    fn routed_forward(
        &self,
        layer: usize,
        hidden: &Tensor,
        routing: &Routing,
    ) -> pdserve_model::Result<Tensor> {
        match self {
            Self::Local(x) => x.routed_forward(layer, hidden, routing),
            Self::Ep(x) => x.routed_forward(layer, hidden, routing),
        }
    }
}

impl ExpertBackend for ServiceExperts {
    fn begin_forward(&mut self, token_ranks: &[u32]) -> Result<(), ModelError> {
        match self {
            Self::Local(x) => x.begin_forward(token_ranks),
            Self::Ep(x) => ExpertBackend::begin_forward(x.as_mut(), token_ranks),
        }
    }

    fn end_step(&mut self) -> Result<(), ModelError> {
        match self {
            Self::Local(x) => x.end_step(),
            Self::Ep(x) => {
                let group: &mut EpGroup = x;
                if let Some(report) = group.finish_step().map_err(ModelError::from)? {
                    tracing::info!(
                        after_steps = report.after_steps,
                        "EPLB re-planned the expert placement"
                    );
                }
                Ok(())
            }
        }
    }

    fn fabric_placements(&self) -> Result<Option<Vec<ExpertPlacement>>, ModelError> {
        match self {
            Self::Local(x) => ExpertBackend::fabric_placements(x),
            Self::Ep(x) => ExpertBackend::fabric_placements(x.as_ref()),
        }
    }

    fn served_gpus(&self) -> Result<Option<Vec<Vec<u32>>>, ModelError> {
        match self {
            Self::Local(x) => x.served_gpus(),
            Self::Ep(x) => ExpertBackend::served_gpus(x.as_ref()),
        }
    }
}
