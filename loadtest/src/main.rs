//! loadtest.

fn main() {}
