//! flow-node: the aiflow agent.
