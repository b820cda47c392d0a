//! # otagw-plugin-sdk
//!
//! The guest SDK of otagw's device-family plugins: a family writes its
//! protocol and nothing of the glue. It implements [`Family`] (describe,
//! settings from typed options, verify, flash, identify) over a [`Port`] and
//! an image [`Source`], and exports it with one line:
//!
//! ```ignore
//! otagw_plugin_sdk::export_family!(MyFamily);
//! ```
//!
//! Built for wasm32 that is a component of the `device-family` world of
//! `wit/v0.2.0` (contract [`CONTRACT`]): the SDK generates the bindings once,
//! implements the exported `plugin` interface for the family, adapts the
//! host's `link` and `image` to [`Port`] and [`Source`], hands the family its
//! settings built from the typed options (and answers `check-options` with
//! the same code), prefixes the family's log lines with its name and maps
//! [`Error`] onto the contract's `flash-error` (the step codes: [`error`]).
//! Built natively it is plain Rust, so a family's code and tests run without
//! wasm, and the gateway shares [`schema`] with plugins.
//!
//! What it is not: a host, or protocol code of any family.
//!
//! # Layout
//! - [`family`]: the [`Family`] trait and its data ([`Info`], [`JobMeta`],
//!   [`ImageInfo`], [`FlashReport`], [`DeviceInfo`]).
//! - [`port`]: the [`Port`] and [`Source`] traits, [`LinkFault`], the link
//!   types of the contract, and [`Inbox`] for byte-wise protocols.
//! - [`fields`]: [`Fields`], reading a family's settings out of checked options.
//! - [`error`]: [`Error`] and its step codes.
//! - [`schema`]: option specs, checking and typing options, the one message
//!   format of option problems.
//! - `guest` (wasm32 only, hidden): the bindings, the host adapters and the
//!   `plugin` export behind [`export_family!`].
//! - [`testing`] (feature `testing`): an in-memory image, a scripted port on
//!   a fake clock, the timed byte queue of device simulators, the checks of a
//!   family's options (schema, defaults, hostile values).
//! - `fuzzing` (feature `testing`, not for wasm, hidden): the scripted device
//!   link the fuzz targets in `fuzz/` drive the families' protocol code with,
//!   and the replay of their corpus as tests.

use std::fmt;

pub mod error;
pub mod family;
pub mod fields;
pub mod port;
pub mod schema;

#[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest;

/// What a link's `closed` error says when the operator stopped the job
/// (Ctrl-C or SIGTERM during `otagw flash`): reads fail with it, writes
/// still go out, so a family can tell the device it gives up (XMODEM's
/// CAN CAN) before it returns.
pub const STOPPED_BY_OPERATOR: &str = "stopped by the operator";

pub use error::Error;
pub use family::{DeviceInfo, Family, FlashReport, ImageInfo, Info, JobMeta};
pub use fields::Fields;
pub use port::{
    GattDefaults, GattDelivery, GattValue, GattWriteMode, Inbox, Level, LinkFault, LinkFeature,
    LinkKind, Parity, Phase, Port, SerialConfig, Source, StopBits,
};

/// The contract version every plugin built with this SDK is built against:
/// the version of the `plugin` interface the component exports, and what
/// `describe` answers as `family-info.contract`.
pub const CONTRACT: &str = "0.2.0";

/// Export `$family` (a type implementing [`Family`]) as the component's
/// `otagw:plugin/plugin@0.2.0` interface. Expands to nothing except on
/// wasm32, so the crate builds and tests natively unchanged. Once per
/// component.
#[macro_export]
macro_rules! export_family {
    ($family:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)] // the exported functions are `extern "C"`
        const _: () = {
            type OtagwFamilyPlugin = $crate::guest::Plugin<$family>;
            $crate::guest::bindings::export!(
                OtagwFamilyPlugin with_types_in $crate::guest::bindings
            );
        };
    };
}

/// Values that have panicked option parsers (non-ASCII inside hex or
/// escapes, numbers past every range, empty, control characters).
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub const HOSTILE_OPTION_VALUES: &[&str] = &[
    "aéb",
    "é",
    "7fé4",
    "0xé",
    "\\xé",
    "\\é",
    "ü=1",
    "dtr=é",
    "99999999999999999999",
    "-1",
    "",
    " ",
    "0x",
    "K",
    "1MiB",
    "1e9",
    "\u{0}",
];

/// Test support: `parse` (option checking) is called with every key in
/// `keys` set to each of [`HOSTILE_OPTION_VALUES`]; it may refuse any of
/// them, but must not panic.
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub fn assert_no_option_value_panics<R>(
    keys: &[&str],
    parse: impl Fn(&[(String, String)]) -> R + std::panic::RefUnwindSafe,
) {
    for k in keys {
        for v in HOSTILE_OPTION_VALUES {
            let opts = vec![(k.to_string(), v.to_string())];
            let r = std::panic::catch_unwind(|| {
                parse(&opts);
            });
            assert!(r.is_ok(), "{k} = {v:?} panicked");
        }
    }
}

/// A device option with a value the family cannot use, as one message
/// (what a [`schema::Problem`] converts into).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError(pub String);

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OptionError {}
