//! Request checks: refusals by name, typed errors with paths, every accepted shape.

use super::*;

fn chat_err(body: &str) -> ApiError {
    chat(body.as_bytes()).expect_err(body)
}

#[test]
fn unknown_and_unsupported_keys_are_refused_by_name() {
    let base = r#""messages":[{"role":"user","content":"hi"}]"#;
    let e = chat_err(&format!(r#"{{{base},"frobnicate":1}}"#));
    assert_eq!(e.param.as_deref(), Some("frobnicate"));
    assert!(e.message.contains("frobnicate"), "{}", e.message);
    for (k, v) in [
        ("response_format", r#"{"type":"json_object"}"#),
        ("tools", r#"[{"type":"function"}]"#),
        ("logit_bias", r#"{"42":5}"#),
        ("presence_penalty", "0.5"),
        ("functions", "[]"),
    ] {
        let e = chat_err(&format!(r#"{{{base},"{k}":{v}}}"#));
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some(k), "{k}: {}", e.message);
        assert!(e.message.contains("not supported"), "{k}: {}", e.message);
    }
    // Neutral values and nulls are accepted.
    let ok = chat(
        format!(
            r#"{{{base},"presence_penalty":0,"logit_bias":{{}},"response_format":{{"type":"text"}},"tools":null,"user":"u1"}}"#
        )
        .as_bytes(),
    )
    .expect("neutral values are accepted");
    assert_eq!(ok.params.user.as_deref(), Some("u1"));
}

#[test]
fn wrong_types_and_ranges_name_the_parameter() {
    let e = chat_err(r#"{"messages":[{"role":"user","content":5}]}"#);
    assert_eq!(e.param.as_deref(), Some("messages[0].content"));
    let e = chat_err(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"many"}"#);
    assert_eq!(e.param.as_deref(), Some("max_tokens"), "{}", e.message);
    let e = chat_err(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-3}"#);
    assert_eq!(e.param.as_deref(), Some("max_tokens"));
    let e = chat_err(r#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#);
    assert_eq!(e.param.as_deref(), Some("temperature"));
    let e = chat_err(r#"{"messages":[{"role":"user","content":"x"}],"n":0}"#);
    assert_eq!(e.param.as_deref(), Some("n"));
    let e = chat_err(r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":3}"#);
    assert_eq!(e.param.as_deref(), Some("top_logprobs"));
    let e = chat_err(
        r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
    );
    assert_eq!(e.param.as_deref(), Some("top_logprobs"));
    let e = chat_err(
        r#"{"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
    );
    assert_eq!(e.param.as_deref(), Some("stream_options"));
    let e = chat_err(r#"{"messages":[]}"#);
    assert_eq!(e.param.as_deref(), Some("messages"));
    let e = chat_err(r#"[1,2]"#);
    assert!(e.message.contains("JSON object"));
    let e = chat(b"{\"messages\": \"\xff\"}").expect_err("invalid UTF-8");
    assert_eq!(e.status, 400);
}

#[test]
fn chat_parses_what_it_implements() {
    let r = chat(
        br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
            "max_completion_tokens":9,"n":2,"stop":["\n\n","END"],"seed":-1,"logprobs":true,"top_logprobs":3,
            "stream":true,"stream_options":{"include_usage":true},"top_k":-1}"#,
    )
    .expect("valid");
    assert_eq!(r.messages[1].content, "ab");
    let p = r.params;
    assert_eq!(
        (p.max_tokens, p.n, p.logprobs, p.include_usage, p.top_k),
        (Some(9), 2, Some(3), true, 0)
    );
    assert_eq!(p.stop, vec!["\n\n".to_string(), "END".into()]);
    assert_eq!(p.seed, Some(u64::MAX));
}

#[test]
fn completion_prompts_in_every_openai_shape() {
    let r = completion(br#"{"prompt":"hi"}"#).expect("string");
    assert!(matches!(&r.prompts[..], [PromptInput::Text(t)] if t == "hi"));
    let r = completion(br#"{"prompt":["a","b"],"n":2}"#).expect("strings");
    assert_eq!(r.prompts.len(), 2);
    let r = completion(br#"{"prompt":[1,2,3]}"#).expect("ids");
    assert!(matches!(&r.prompts[..], [PromptInput::Ids(v)] if v == &[1, 2, 3]));
    let r = completion(br#"{"prompt":[[1],[2,3]]}"#).expect("lists of ids");
    assert_eq!(r.prompts.len(), 2);
    for bad in [
        r#"{"prompt":[]}"#,
        r#"{"prompt":[1,"a"]}"#,
        r#"{"prompt":[-1]}"#,
        r#"{"prompt":{"a":1}}"#,
    ] {
        let e = completion(bad.as_bytes()).expect_err(bad);
        assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
    }
    let e = completion(br#"{"prompt":"x","echo":true,"logprobs":2}"#).expect_err("echo");
    assert_eq!(e.param.as_deref(), Some("echo"));
    let e = completion(br#"{"prompt":"x","suffix":"y"}"#).expect_err("suffix");
    assert_eq!(e.param.as_deref(), Some("suffix"));
    let e = completion(br#"{"prompt":"x","messages":[]}"#).expect_err("chat key");
    assert_eq!(e.param.as_deref(), Some("messages"));
    let e = completion(br#"{"prompt":["a","b","c","d","e"],"n":16}"#).expect_err("too many");
    assert_eq!(e.param.as_deref(), Some("n"));
}
