//! Failover decisions (pure).
