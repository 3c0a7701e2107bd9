//! The decision path over real mTLS: one row per rule, each with its reason code.
