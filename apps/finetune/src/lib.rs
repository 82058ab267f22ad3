//! flow_finetune: filled in by its issue.
