//! flow_partition: filled in by its issue.
