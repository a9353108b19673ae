//! OpenAI-compatible wire types, internal service messages and the one error envelope.
