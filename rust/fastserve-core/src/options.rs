//! Options defined once: a struct declared with [`options!`] gets its serde form (defaults, no
//! unknown keys), `Default`, a `describe()` table (name, help from the doc comment, kind,
//! defaults, bounds) from which the Python layer builds CLI flags and checks keywords, and a
//! `check_ranges()` generated from the same bounds.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

/// One option as the Python layer sees it, to build CLI flags and check keywords.
#[derive(Debug, Clone, Serialize)]
pub struct OptionInfo {
    pub name: &'static str,
    pub help: &'static str,
    /// `int`, `float`, `bool`, `str` or `path`.
    pub kind: &'static str,
    /// None is a value (e.g. "no gRPC listener").
    pub optional: bool,
    /// The embedding API's default.
    pub default: Value,
    /// The command's default where it differs (the command serves gRPC and metrics by default).
    pub cli_default: Option<Value>,
    /// Where the flag is listed: `server`, `limits` or `security`; `hidden` options have no flag
    /// (tokens come from files or the environment, never the command line).
    pub group: &'static str,
    pub choices: &'static [&'static str],
    /// Inclusive bounds of a number (each item of a list), checked by `check_ranges`.
    pub min: Option<i64>,
    pub max: Option<i64>,
}

/// How an option's Rust type shows in [`OptionInfo`].
pub trait OptionKind {
    const KIND: &'static str;
    const OPTIONAL: bool = false;
}

macro_rules! kind {
    ($($t:ty => $k:literal),*) => { $(impl OptionKind for $t { const KIND: &'static str = $k; })* };
}
kind!(u16 => "int", u32 => "int", u64 => "int", usize => "int", f64 => "float", bool => "bool", String => "str", PathBuf => "path");

impl OptionKind for Vec<usize> {
    const KIND: &'static str = "int_list";
}

/// A value whose numbers can be checked against an option's bounds.
pub trait InRange {
    fn in_range(&self, min: i64, max: i64) -> bool;
}

macro_rules! in_range {
    ($($t:ty),*) => { $(impl InRange for $t {
        fn in_range(&self, min: i64, max: i64) -> bool {
            i64::try_from(*self).is_ok_and(|v| (min..=max).contains(&v))
        }
    })* };
}
in_range!(u16, u32, u64, usize);

impl<T: InRange> InRange for Vec<T> {
    fn in_range(&self, min: i64, max: i64) -> bool {
        self.iter().all(|v| v.in_range(min, max))
    }
}

impl<T: InRange> InRange for Option<T> {
    fn in_range(&self, min: i64, max: i64) -> bool {
        self.as_ref().is_none_or(|v| v.in_range(min, max))
    }
}

impl<T: OptionKind> OptionKind for Option<T> {
    const KIND: &'static str = T::KIND;
    const OPTIONAL: bool = true;
}

/// The value given, else the default.
macro_rules! or_default {
    ($default:expr) => {
        $default
    };
    ($default:expr, $value:expr) => {
        $value
    };
}

/// Declares an options struct: serde with defaults and no unknown keys, `Default`, and
/// `describe()` listing each field with its doc comment as help.
macro_rules! options {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                #[doc = $help:literal]
                $field:ident : $ty:ty = $default:expr
                $(, cli = $cli:expr)?
                $(, group = $group:literal)?
                $(, choices = $choices:expr)?
                $(, range = $min:literal ..= $max:literal)?
                ;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $( #[doc = $help] pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl $name {
            /// Every option with its help, kind and defaults, in declaration order.
            pub fn describe() -> Vec<$crate::options::OptionInfo> {
                let defaults = Self::default();
                vec![$(
                    $crate::options::OptionInfo {
                        name: stringify!($field),
                        help: $help.trim(),
                        kind: <$ty as $crate::options::OptionKind>::KIND,
                        optional: <$ty as $crate::options::OptionKind>::OPTIONAL,
                        default: serde_json::to_value(&defaults.$field).unwrap_or(serde_json::Value::Null),
                        cli_default: $crate::options::or_default!(None $(, Some(serde_json::to_value::<$ty>($cli).unwrap_or(serde_json::Value::Null)))?),
                        group: $crate::options::or_default!("server" $(, $group)?),
                        choices: $crate::options::or_default!(&[] $(, $choices)?),
                        min: $crate::options::or_default!(None $(, Some::<i64>($min))?),
                        max: $crate::options::or_default!(None $(, Some::<i64>($max))?),
                    },
                )*]
            }

            /// Refuses a number outside its option's bounds, naming the option and the bounds.
            pub fn check_ranges(&self) -> Result<(), String> {
                $( $(
                    let (min, max): (i64, i64) = ($min, $max);
                    if !$crate::options::InRange::in_range(&self.$field, min, max) {
                        let got = serde_json::to_string(&self.$field).unwrap_or_default();
                        return Err(format!("{} must be between {min} and {max}, got {got}", stringify!($field)));
                    }
                )? )*
                Ok(())
            }
        }
    };
}

pub(crate) use {options, or_default};
