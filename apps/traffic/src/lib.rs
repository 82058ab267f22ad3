//! flow_traffic: filled in by its issue.
