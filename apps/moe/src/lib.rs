//! flow_moe: filled in by its issue.
