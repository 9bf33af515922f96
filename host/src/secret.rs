//! Secrets in `[pipeline.config]`: values taken from the environment
//! (`token = { env = "SLACK_TOKEN" }`) so they need not live in the file.
//!
//! A secret's value exists in two places only: in [`Secret`], whose `Debug`
//! and `Display` print `<redacted>`, and in the map handed to the plugin
//! ([`PluginSettings`], whose `Debug` prints the keys only). Errors about a
//! secret name its variable, never its value, so neither logs, `warren check`,
//! the ops endpoint nor an error message can show it. Its value is also
//! handed to `crate::logging::hide`, so that the log writer replaces it
//! should any library log it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use anyhow::{Result, bail};
use serde::Deserialize;

/// A value that must not be shown.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that needs it (the plugin).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One `[pipeline.config]` value: text written in the file, or a reference to
/// an environment variable, resolved when the configuration is loaded.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    /// `key = "value"`.
    Text(String),
    /// `key = { env = "NAME" }`.
    Env(EnvSetting),
}

/// `{ env = "NAME" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvSetting {
    /// The environment variable that holds the value.
    pub env: String,
    /// Its value, once resolved.
    #[serde(skip)]
    value: Option<Secret>,
}

impl Setting {
    /// Read the environment variable of an `env` setting. A variable that is
    /// not set, empty, or not UTF-8 is an error naming it (and not its value).
    pub fn resolve(&mut self) -> Result<()> {
        let Self::Env(e) = self else {
            return Ok(());
        };
        if e.env.is_empty() {
            bail!("{{ env = \"\" }} names no environment variable");
        }
        match std::env::var(&e.env) {
            Ok(v) if !v.is_empty() => {
                crate::logging::hide(&v);
                e.value = Some(Secret(v));
                Ok(())
            }
            Ok(_) => bail!("environment variable {} is empty", e.env),
            Err(std::env::VarError::NotPresent) => {
                bail!("environment variable {} is not set", e.env)
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                bail!("environment variable {} is not valid UTF-8", e.env)
            }
        }
    }

    /// The text of a plain value; `None` for a secret, which is never shown.
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Text(t) => Some(t),
            Self::Env(_) => None,
        }
    }

    /// The value the plugin gets; `None` for a secret not resolved (only an
    /// unvalidated configuration has one).
    fn value(&self) -> Option<&str> {
        match self {
            Self::Text(t) => Some(t),
            Self::Env(e) => e.value.as_ref().map(Secret::expose),
        }
    }
}

/// The settings a plugin reads with `host.config(key)`, secrets resolved.
#[derive(Clone, Default)]
pub struct PluginSettings(Arc<BTreeMap<String, String>>);

impl PluginSettings {
    /// The resolved settings of a `[pipeline.config]` table.
    pub fn new(settings: &BTreeMap<String, Setting>) -> Self {
        Self(Arc::new(
            settings
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.value()?.to_string())))
                .collect(),
        ))
    }

    /// The map the runtime hands to plugin instances.
    pub fn shared(&self) -> Arc<BTreeMap<String, String>> {
        self.0.clone()
    }
}

impl fmt::Debug for PluginSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys only: which of the values are secrets is not known here.
        f.debug_set().entries(self.0.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        let mut settings = BTreeMap::new();
        settings.insert(
            "token".to_string(),
            Setting::Env(EnvSetting {
                env: "X".into(),
                value: Some(s),
            }),
        );
        settings.insert("plain".to_string(), Setting::Text("shown".into()));
        let debug = format!("{settings:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        let resolved = PluginSettings::new(&settings);
        assert_eq!(
            resolved.shared().get("token").map(String::as_str),
            Some("hunter2")
        );
        let debug = format!("{resolved:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("token"),
            "{debug}"
        );
    }
}
