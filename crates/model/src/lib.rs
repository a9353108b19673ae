//! DeepSeek-V3 on candle.
