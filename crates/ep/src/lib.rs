//! Expert parallelism: placement, EPLB, dispatch/combine over the simulated fabric, EP workers
