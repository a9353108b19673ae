//! OpenAI-compatible front door.
