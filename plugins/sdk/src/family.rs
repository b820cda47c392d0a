//! [`Family`]: what a device family implements, in plain Rust, and the data
//! it answers with ([`Info`], [`ImageInfo`], [`FlashReport`],
//! [`DeviceInfo`]) and gets ([`JobMeta`]).
//!
//! What it is: the whole surface of a plugin, with no bindings in sight, so
//! a family's code (and its tests) compile and run natively.
//! [`crate::export_family!`] turns an implementation into the component's
//! exports on wasm32.
//!
//! What it is not: the protocol. A family's [`Family::flash`] calls its own
//! protocol code with the [`Port`] and [`Source`] it is given.

use crate::error::Error;
use crate::port::{GattDefaults, LinkKind, Port, SerialConfig, Source};
use crate::schema::{self, OptionSpec, Options, Problem};

/// What a family says about itself (the contract's `family-info`, less the
/// `contract`, which the SDK fills in: [`crate::CONTRACT`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The family name devices are configured with, e.g. "xmodem".
    pub name: String,
    /// The plugin's own version: `env!("CARGO_PKG_VERSION")`.
    pub version: String,
    /// One line for operators.
    pub description: String,
    /// The link kinds the family can work over.
    pub transports: Vec<LinkKind>,
    /// Serial settings the host applies before `flash` and `identify`.
    pub default_serial: Option<SerialConfig>,
    /// What plain reads and writes mean on BLE links; required when
    /// `transports` has [`LinkKind::Ble`].
    pub default_gatt: Option<GattDefaults>,
    /// Every device option, in the order operators see them.
    pub options: Vec<OptionSpec>,
}

impl Info {
    /// The family `name` at `version` (`env!("CARGO_PKG_VERSION")`), said in
    /// one line by `description`; no transports, link defaults or options
    /// yet (the builder methods below add them).
    pub fn new(name: &str, version: &str, description: &str) -> Info {
        Info {
            name: name.to_string(),
            version: version.to_string(),
            description: description.to_string(),
            transports: Vec::new(),
            default_serial: None,
            default_gatt: None,
            options: Vec::new(),
        }
    }

    /// The link kinds the family works over.
    pub fn transports(mut self, kinds: impl IntoIterator<Item = LinkKind>) -> Info {
        self.transports = kinds.into_iter().collect();
        self
    }

    /// The serial settings the host applies first.
    pub fn serial(mut self, config: SerialConfig) -> Info {
        self.default_serial = Some(config);
        self
    }

    /// What plain reads and writes mean on BLE links.
    pub fn gatt(mut self, defaults: GattDefaults) -> Info {
        self.default_gatt = Some(defaults);
        self
    }

    /// The option schema.
    pub fn options(mut self, specs: Vec<OptionSpec>) -> Info {
        self.options = specs;
        self
    }
}

/// What the gateway knows about a job when it calls `verify` or `flash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobMeta {
    /// The version the upgrade notice announces, when there is one.
    pub version: Option<String>,
    /// The firmware module the notice is for ("default" when none).
    pub module: String,
    /// The device's options, checked against the family's schema.
    pub options: Options,
}

/// What `verify` found in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The version written inside the image, when the format carries one.
    pub version: Option<String>,
    /// Bytes that will be written to the device.
    pub payload_size: u64,
    /// One line describing the image, for logs.
    pub summary: String,
    /// Things operators should know that do not stop the job; the SDK logs
    /// each one as a warning.
    pub warnings: Vec<String>,
}

/// What `flash` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashReport {
    /// Payload bytes the device acknowledged.
    pub bytes_sent: u64,
    /// Blocks or requests that had to be sent again.
    pub retries: u32,
    /// One line describing the transfer, for logs.
    pub summary: String,
}

/// What `identify` read from the device (the contract's `device-info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The firmware version running on the device.
    pub version: String,
    /// The hardware model or part, for people.
    pub model: Option<String>,
    /// The hardware model as an identifier rollouts compare exactly, in a
    /// form the family documents.
    pub hardware_id: Option<String>,
    /// The device's own unique identity, when the protocol gives it.
    pub serial_number: Option<String>,
    /// Anything else, as (name, value): names lowercase letters, digits and
    /// '_', each at most once.
    pub attributes: Vec<(String, String)>,
}

impl DeviceInfo {
    /// A device that told its version and nothing else.
    pub fn version(version: impl Into<String>) -> DeviceInfo {
        DeviceInfo {
            version: version.into(),
            ..DeviceInfo::default()
        }
    }
}

/// A device family: its description, its options and the three operations.
///
/// Implement it on a unit struct and export it with
/// [`crate::export_family!`]. The SDK builds [`Family::Settings`] from the
/// device's options for every call (and for the contract's `check-options`),
/// so the operations get them typed and checked.
pub trait Family {
    /// The family's typed settings, built from the device's options.
    type Settings;

    /// The family's description and option schema. Must not fail.
    fn info() -> Info;

    /// The settings from options checked against the schema of [`Family::info`]
    /// (defaults filled in, unknown keys removed). What the schema cannot say
    /// (the syntax of `text` options, options that only work together) is
    /// checked here: every problem, each naming its option.
    fn settings(options: &Options) -> Result<Self::Settings, Vec<Problem>>;

    /// Check the image before any device is touched. The default accepts
    /// any image that is not empty and says nothing about it.
    fn verify(
        image: &mut dyn Source,
        settings: &Self::Settings,
        meta: &JobMeta,
    ) -> Result<ImageInfo, Error> {
        let _ = (settings, meta);
        let size = image.size();
        if size == 0 {
            return Err(Error::Verify("the image is empty: nothing to send".into()));
        }
        Ok(ImageInfo {
            version: None,
            payload_size: size,
            summary: format!("{size} bytes"),
            warnings: Vec::new(),
        })
    }

    /// Put the image on the device behind `port`.
    fn flash(
        port: &mut dyn Port,
        image: &mut dyn Source,
        settings: &Self::Settings,
        meta: &JobMeta,
    ) -> Result<FlashReport, Error>;

    /// Read what the device runs. The default answers
    /// [`Error::Unsupported`]: the gateway then reports the version of the
    /// notice instead.
    fn identify(port: &mut dyn Port, settings: &Self::Settings) -> Result<DeviceInfo, Error> {
        let _ = (port, settings);
        Err(Error::Unsupported(format!(
            "{} cannot read a version from a device",
            Self::info().name
        )))
    }

    /// The settings from options as operators write them (text, as in the
    /// gateway's configuration): checked against the schema, then
    /// [`Family::settings`]. For tests, and for plugins that get text options
    /// (contract 0.1).
    fn settings_from_text(raw: &[(String, String)]) -> Result<Self::Settings, Vec<Problem>>
    where
        Self: Sized,
    {
        let options = schema::check(&Self::info().options, raw)?;
        Self::settings(&options)
    }

    /// The settings with every option at its default, e.g. for a `Default`
    /// implementation. Panics when the schema's defaults make no settings: a
    /// bug of the family's, which `testing::check_family` finds.
    fn default_settings() -> Self::Settings
    where
        Self: Sized,
    {
        Self::settings_from_text(&[]).unwrap_or_else(|problems| {
            panic!(
                "{}: the schema's defaults make no settings: {problems:?}",
                Self::info().name
            )
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::port::{LinkFault, Port};
    use crate::schema::OptionSpec;

    /// A family that uses every default.
    pub(crate) struct Minimal;

    impl Family for Minimal {
        type Settings = i64;

        fn info() -> Info {
            Info::new("minimal", "1.0.0", "the defaults")
                .transports([LinkKind::Tcp])
                .options(vec![
                    OptionSpec::integer("n", 0, 9, "a digit").default_int(3),
                ])
        }

        fn settings(options: &Options) -> Result<i64, Vec<Problem>> {
            options
                .integer("n")
                .ok_or_else(|| vec![Problem::new(Some("n"), "missing")])
        }

        fn flash(
            port: &mut dyn Port,
            _: &mut dyn Source,
            n: &i64,
            _: &JobMeta,
        ) -> Result<FlashReport, Error> {
            port.write(&[*n as u8])?;
            Ok(FlashReport {
                bytes_sent: 1,
                retries: 0,
                summary: "one byte".into(),
            })
        }
    }

    /// A source of `n` zeros.
    struct Zeros(u64);

    impl Source for Zeros {
        fn size(&mut self) -> u64 {
            self.0
        }
        fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
            vec![0; self.0.saturating_sub(offset).min(u64::from(len)) as usize]
        }
    }

    /// A port that refuses to write.
    struct Broken;

    impl Port for Broken {
        fn write(&mut self, _: &[u8]) -> Result<(), LinkFault> {
            Err(LinkFault::Io("gone".into()))
        }
        fn read(&mut self, _: u32, _: u32) -> Result<Vec<u8>, LinkFault> {
            Ok(Vec::new())
        }
        fn now_ms(&mut self) -> u64 {
            0
        }
        fn sleep(&mut self, _: u32) {}
    }

    fn meta() -> JobMeta {
        JobMeta {
            version: None,
            module: "default".into(),
            options: Options::default(),
        }
    }

    #[test]
    fn defaults_verify_by_size_and_cannot_identify() {
        let info = Minimal::verify(&mut Zeros(10), &3, &meta()).unwrap();
        assert_eq!(info.payload_size, 10);
        assert!(matches!(
            Minimal::verify(&mut Zeros(0), &3, &meta()),
            Err(Error::Verify(_))
        ));
        assert_eq!(
            Minimal::identify(&mut Broken, &3),
            Err(Error::Unsupported(
                "minimal cannot read a version from a device".into()
            ))
        );
        assert_eq!(
            Minimal::flash(&mut Broken, &mut Zeros(1), &3, &meta()),
            Err(Error::Transfer("link I/O error: gone".into()))
        );
    }

    #[test]
    fn settings_from_text_go_through_the_schema() {
        assert_eq!(Minimal::settings_from_text(&[]), Ok(3));
        assert_eq!(Minimal::default_settings(), 3);
        assert_eq!(
            Minimal::settings_from_text(&[("N".into(), "7".into())]),
            Ok(7)
        );
        let problems = Minimal::settings_from_text(&[("n".into(), "70".into())]).unwrap_err();
        assert_eq!(problems[0].option.as_deref(), Some("n"));
    }

    #[test]
    fn short_reads_are_read_again_and_a_short_image_is_named() {
        assert_eq!(Zeros(5).read_exact(1, 4), Ok(vec![0; 4]));
        assert_eq!(
            Zeros(5).read_exact(3, 4),
            Err(Error::Transfer(
                "image: read at offset 5 returned nothing, 2 bytes short of the size the image \
                 announced"
                    .into()
            ))
        );
    }
}
