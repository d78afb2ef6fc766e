//! `[[ensemble.step]]` as `config.toml` writes it, with Triton's names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `[ensemble]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleConfig {
    pub step: Vec<Step>,
}

/// One step: a model, and which ensemble tensors its inputs and outputs are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub model_name: String,
    /// -1: the version requests without one reach (routing, labels and weights apply).
    #[serde(default = "default_version")]
    pub model_version: i64,
    /// Model input name → ensemble tensor name.
    #[serde(default)]
    pub input_map: BTreeMap<String, String>,
    /// Model output name → ensemble tensor name.
    #[serde(default)]
    pub output_map: BTreeMap<String, String>,
}

fn default_version() -> i64 {
    -1
}

impl Step {
    /// The version to resolve: None lets routing pick.
    pub fn version(&self) -> Option<String> {
        (self.model_version >= 0).then(|| self.model_version.to_string())
    }

    /// How error messages name the step.
    pub fn label(&self, index: usize) -> String {
        format!("step {} (model '{}')", index + 1, self.model_name)
    }
}
