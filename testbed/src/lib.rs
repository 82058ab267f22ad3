//! flow_testbed: filled in by its issue.
