//! flow_familial: filled in by its issue.
