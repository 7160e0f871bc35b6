//! Settings: the command line (`cli`, clap with an environment variable on every flag) and
//! the validated [`Config`] it becomes once at start-up (`config`).

pub mod cli;
pub mod config;

pub use self::config::{AccessLogTarget, Accounting, Config, ConfigError, LogFormat, StoreKind};
