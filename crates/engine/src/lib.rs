//! Decode/prefill engine: scheduler (pure step), paged latent-KV block pool, executors, TBO, MTP loop
