//! Helpers shared by the integration tests.

use candle_core::Tensor;

/// The largest absolute elementwise difference of two tensors of one shape.
#[allow(dead_code)]
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The SmolLM2-135M-Instruct GGUF: `$AIFLOW_SMOLLM2_GGUF`, else
/// `$AIFLOW_HOME/smollm2-135m-instruct/model.gguf`, else
/// `~/.cache/aiflow/models/smollm2-135m-instruct/model.gguf`. `None` (with a note) when
/// absent — except under `CI=true`, where a missing model is a failure: CI pulls it.
#[allow(dead_code)]
pub fn smollm2_gguf() -> Option<std::path::PathBuf> {
    let p = if let Ok(p) = std::env::var("AIFLOW_SMOLLM2_GGUF") {
        std::path::PathBuf::from(p)
    } else {
        let root = match std::env::var("AIFLOW_HOME") {
            Ok(h) => std::path::PathBuf::from(h),
            Err(_) => std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/aiflow/models"),
        };
        root.join("smollm2-135m-instruct/model.gguf")
    };
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} is missing: CI must pull the model first (flow-node model pull smollm2-135m-instruct)",
        p.display()
    );
    eprintln!(
        "skipped: {} is absent (flow-node model pull smollm2-135m-instruct)",
        p.display()
    );
    None
}
