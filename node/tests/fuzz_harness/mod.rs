//! What the `openai_request` cargo-fuzz target runs (`fuzz/fuzz_targets/openai_request.rs`),
//! shared with `tests/fuzz_corpus.rs`, which replays the committed inputs on stable.

use flow_node::http::params;

/// Any bytes as a `/v1/chat/completions` and a `/v1/completions` body: parsed or refused
/// with a 4xx that says something, never a panic.
pub fn openai_request(data: &[u8]) {
    let results = [
        params::chat(data).map(|r| (r.params, r.messages.len())),
        params::completion(data).map(|r| (r.params, r.prompts.len())),
    ];
    for r in results {
        match r {
            Ok((p, items)) => {
                assert!(items >= 1, "an accepted request has something to answer");
                assert!(p.n >= 1 && p.n as usize <= params::MAX_CHOICES);
                assert!(p.stop.len() <= params::MAX_STOPS);
                assert!((0.0..=2.0).contains(&p.temperature));
            }
            Err(e) => {
                assert!(e.status.is_client_error(), "{e:?}");
                assert!(!e.message.is_empty());
            }
        }
    }
}
