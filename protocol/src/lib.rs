//! flow_protocol: filled in by its issue.
