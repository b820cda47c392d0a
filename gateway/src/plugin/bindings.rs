//! Every `bindgen!` of the plugin contract, in one place (CONVENTIONS 9), and
//! the one enum the rest of the host dispatches on.
//!
//! Zed's extension host is the model: one module per contract version
//! ([`v0_1_0`], [`v0_2_0`]), each generated from its own `wit/vX.Y.Z` folder and
//! carrying its version, the interface a plugin exports and the interfaces it
//! may import; a [`latest`] alias; [`Contract`], an enum over the versions with
//! [`Contract::MIN`] and [`Contract::MAX`]; and [`FamilyPre`] / [`Family`], the
//! pre-linked and instantiated plugin of whichever version it was built for.
//! The host implements the latest `host` interface and adapts the older ones
//! to it (`host.rs`), so behaviour is written once.
//!
//! Adding a version: a `contract_version!` line, a case in [`Contract`],
//! [`FamilyPre`] and [`Family`], and the conversions the compiler then asks for.

use wasmtime::component::{InstancePre, Linker};

use super::PluginState;

/// One contract version's bindings: `bindgen!` over its WIT folder with the
/// host's own types for the `link` and `image` resources (so every version's
/// resources are the same host objects), and the names the loader checks.
macro_rules! contract_version {
    ($module:ident, $version:tt, $wit:tt) => {
        pub mod $module {
            wasmtime::component::bindgen!({
                path: $wit,
                world: "device-family",
                imports: { default: async | trappable },
                exports: { default: async },
                with: {
                    "otagw:plugin/host.link": crate::link::Link,
                    "otagw:plugin/host.image": crate::plugin::host::ImageHandle,
                },
            });

            /// The contract version, as plugins report it in `describe`.
            pub const VERSION: &str = $version;
            /// The interface a plugin of this version exports.
            pub const PLUGIN_EXPORT: &str = concat!("otagw:plugin/plugin@", $version);
            /// The contract's interfaces a plugin of this version may import.
            pub const IMPORTS: &[&str] = &[
                concat!("otagw:plugin/types@", $version),
                concat!("otagw:plugin/host@", $version),
            ];
        }
    };
}

contract_version!(v0_1_0, "0.1.0", "../wit/v0.1.0");
contract_version!(v0_2_0, "0.2.0", "../wit/v0.2.0");

/// The newest contract: what the host implements natively and what new
/// plugins (the SDK) are built against.
pub use v0_2_0 as latest;

/// A contract version this host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Contract {
    V0_1_0,
    V0_2_0,
}

impl Contract {
    /// Every supported version, oldest first.
    pub const ALL: [Contract; 2] = [Contract::V0_1_0, Contract::V0_2_0];
    /// The oldest version this host runs.
    pub const MIN: Contract = Contract::V0_1_0;
    /// The newest version this host runs ([`latest`]).
    pub const MAX: Contract = Contract::V0_2_0;

    pub fn version(self) -> &'static str {
        match self {
            Contract::V0_1_0 => v0_1_0::VERSION,
            Contract::V0_2_0 => v0_2_0::VERSION,
        }
    }

    pub fn plugin_export(self) -> &'static str {
        match self {
            Contract::V0_1_0 => v0_1_0::PLUGIN_EXPORT,
            Contract::V0_2_0 => v0_2_0::PLUGIN_EXPORT,
        }
    }

    /// The contract's interfaces a plugin of this version may import.
    pub fn imports(self) -> &'static [&'static str] {
        match self {
            Contract::V0_1_0 => v0_1_0::IMPORTS,
            Contract::V0_2_0 => v0_2_0::IMPORTS,
        }
    }

    /// The version whose `plugin` interface a component exports under `name`.
    pub fn from_export(name: &str) -> Option<Contract> {
        Contract::ALL
            .into_iter()
            .find(|c| c.plugin_export() == name)
    }

    /// The version a plugin names in `describe`.
    pub fn from_version(v: &str) -> Option<Contract> {
        Contract::ALL.into_iter().find(|c| c.version() == v)
    }

    /// "0.1.0 to 0.2.0", for messages.
    pub fn supported_range() -> String {
        format!("{} to {}", Contract::MIN.version(), Contract::MAX.version())
    }
}

impl std::fmt::Display for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.version())
    }
}

/// Link every supported version's `host` interface (each under its own
/// versioned name) into `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    v0_1_0::DeviceFamily::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    v0_2_0::DeviceFamily::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    Ok(())
}

/// A plugin pre-linked for the version it was built against.
pub(crate) enum FamilyPre {
    V0_1_0(v0_1_0::DeviceFamilyPre<PluginState>),
    V0_2_0(v0_2_0::DeviceFamilyPre<PluginState>),
}

impl FamilyPre {
    pub(crate) fn new(contract: Contract, pre: InstancePre<PluginState>) -> wasmtime::Result<Self> {
        Ok(match contract {
            Contract::V0_1_0 => FamilyPre::V0_1_0(v0_1_0::DeviceFamilyPre::new(pre)?),
            Contract::V0_2_0 => FamilyPre::V0_2_0(v0_2_0::DeviceFamilyPre::new(pre)?),
        })
    }

    pub(crate) async fn instantiate(
        &self,
        store: &mut wasmtime::Store<PluginState>,
    ) -> wasmtime::Result<Family> {
        Ok(match self {
            FamilyPre::V0_1_0(p) => Family::V0_1_0(p.instantiate_async(store).await?),
            FamilyPre::V0_2_0(p) => Family::V0_2_0(p.instantiate_async(store).await?),
        })
    }
}

/// An instantiated plugin of one version.
pub(crate) enum Family {
    V0_1_0(v0_1_0::DeviceFamily),
    V0_2_0(v0_2_0::DeviceFamily),
}

#[cfg(test)]
mod contract_tests {
    use super::{Contract, latest};

    /// Each version's names agree with its number and its WIT folder, so a
    /// version added in one place and not another fails here.
    #[test]
    fn every_version_is_named_consistently() {
        assert_eq!(Contract::ALL.first(), Some(&Contract::MIN));
        assert_eq!(Contract::ALL.last(), Some(&Contract::MAX));
        assert!(Contract::ALL.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(latest::VERSION, Contract::MAX.version());
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        for c in Contract::ALL {
            let v = c.version();
            assert_eq!(c.plugin_export(), format!("otagw:plugin/plugin@{v}"));
            assert_eq!(Contract::from_export(c.plugin_export()), Some(c));
            assert_eq!(Contract::from_version(v), Some(c));
            assert!(c.imports().iter().all(|i| i.ends_with(&format!("@{v}"))));
            let text = std::fs::read_to_string(wit.join(format!("v{v}/plugin.wit"))).unwrap();
            assert!(text.contains(&format!("package otagw:plugin@{v};")), "{v}");
        }
        assert_eq!(Contract::from_export("otagw:plugin/plugin@0.3.0"), None);
        assert_eq!(Contract::supported_range(), "0.1.0 to 0.2.0");
    }
}

/// `wit/v0.2.0` is frozen once released: these spell out every record field
/// and match every case without a wildcard, so an edit in place (a field or a
/// case more) stops this file compiling. A change is a new version folder.
#[cfg(test)]
mod v0_2_0_shape {
    use wasmtime::component::Resource;

    use super::v0_2_0::exports::otagw::plugin::plugin::Guest;
    use super::v0_2_0::otagw::plugin::host::{Host, HostLink};
    use super::v0_2_0::otagw::plugin::types::*;
    use crate::link::Link;

    fn family() -> FamilyInfo {
        FamilyInfo {
            name: "smp".into(),
            version: "1.0.0".into(),
            contract: "0.2.0".into(),
            description: "mcumgr SMP".into(),
            transports: vec![
                LinkKind::Serial,
                LinkKind::Ble,
                LinkKind::Other("can".into()),
            ],
            default_serial: Some(SerialConfig {
                baud: 115_200,
                data_bits: 8,
                parity: Parity::None,
                stop_bits: StopBits::One,
            }),
            default_gatt: Some(GattDefaults {
                service: "8d53dc1d-1db7-4cd3-868b-8a527460aa84".into(),
                write: "da2e7828-fbce-4e01-ae9e-261174997c48".into(),
                write_mode: GattWriteMode::WithoutResponse,
                notify: "da2e7828-fbce-4e01-ae9e-261174997c48".into(),
            }),
            options: vec![
                OptionSpec {
                    name: "protocol".into(),
                    kind: OptionKind::Choice(vec![ChoiceValue {
                        value: "xmodem".into(),
                        aliases: vec!["xmodem-1k".into()],
                        doc: String::new(),
                    }]),
                    default: Some(OptionValue::Choice("xmodem".into())),
                    required: false,
                    secret: false,
                    doc: "which protocol to speak".into(),
                },
                OptionSpec {
                    name: "reset_sequence".into(),
                    kind: OptionKind::Text(TextRules {
                        max_length: Some(512),
                        syntax: Some("steps like `dtr=1, sleep=100`".into()),
                    }),
                    default: None,
                    required: true,
                    secret: true,
                    doc: String::new(),
                },
            ],
        }
    }

    fn kinds() -> Vec<OptionKind> {
        vec![
            OptionKind::Boolean,
            OptionKind::Integer(IntegerRange { min: 0, max: 1000 }),
            OptionKind::Bytes(BytesRules {
                encoding: BytesEncoding::Escaped,
                max_length: None,
            }),
            OptionKind::Bytes(BytesRules {
                encoding: BytesEncoding::Hex,
                max_length: Some(16),
            }),
            OptionKind::Duration(DurationRange {
                min_ms: 10,
                max_ms: 3_600_000,
            }),
            OptionKind::Size(SizeRange {
                min: 1,
                max: 1 << 32,
            }),
        ]
    }

    fn value_kind(v: &OptionValue) -> &'static str {
        match v {
            OptionValue::Text(_) => "text",
            OptionValue::Boolean(_) => "boolean",
            OptionValue::Integer(_) => "integer",
            OptionValue::Bytes(_) => "bytes",
            OptionValue::Choice(_) => "choice",
            OptionValue::Duration(_) => "duration",
            OptionValue::Size(_) => "size",
        }
    }

    fn spec_kind(k: &OptionKind) -> &'static str {
        match k {
            OptionKind::Text(_) => "text",
            OptionKind::Boolean => "boolean",
            OptionKind::Integer(_) => "integer",
            OptionKind::Bytes(_) => "bytes",
            OptionKind::Choice(_) => "choice",
            OptionKind::Duration(_) => "duration",
            OptionKind::Size(_) => "size",
        }
    }

    fn link_kind(k: &LinkKind) -> String {
        match k {
            LinkKind::Serial => "serial".into(),
            LinkKind::Tcp => "tcp".into(),
            LinkKind::Ble => "ble".into(),
            LinkKind::Other(name) => name.clone(),
        }
    }

    fn link_error(e: &LinkError) -> &str {
        match e {
            LinkError::Unsupported(m)
            | LinkError::Closed(m)
            | LinkError::Timeout(m)
            | LinkError::NotFound(m)
            | LinkError::Invalid(m)
            | LinkError::Io(m) => m,
        }
    }

    /// The step code each `flash-error` maps onto (ARCHITECTURE.md).
    fn step(e: &FlashError) -> i32 {
        match e {
            FlashError::Verify(_) => -3,
            FlashError::Transfer(_) | FlashError::Device(_) | FlashError::Timeout(_) => -4,
            FlashError::Unsupported(_) | FlashError::Options(_) | FlashError::Other(_) => -1,
        }
    }

    #[test]
    fn records_and_cases_are_as_released() {
        let f = family();
        let names: Vec<String> = f.transports.iter().map(link_kind).collect();
        assert_eq!(names, ["serial", "ble", "can"]);
        let spec_kinds: Vec<&str> = f.options.iter().map(|o| spec_kind(&o.kind)).collect();
        assert_eq!(spec_kinds, ["choice", "text"]);
        let kinds: Vec<&str> = kinds().iter().map(spec_kind).collect();
        assert_eq!(
            kinds,
            ["boolean", "integer", "bytes", "bytes", "duration", "size"]
        );

        let options: Options = vec![
            ("filename".into(), OptionValue::Text("fw.bin".into())),
            ("erase".into(), OptionValue::Boolean(false)),
            ("retries".into(), OptionValue::Integer(5)),
            (
                "enter_command".into(),
                OptionValue::Bytes(b"update\r".to_vec()),
            ),
            ("protocol".into(), OptionValue::Choice("ymodem".into())),
            ("timeout_ms".into(), OptionValue::Duration(5000)),
            ("flash_size".into(), OptionValue::Size(256 * 1024)),
        ];
        let value_kinds: Vec<&str> = options.iter().map(|(_, v)| value_kind(v)).collect();
        assert_eq!(
            value_kinds,
            [
                "text", "boolean", "integer", "bytes", "choice", "duration", "size"
            ]
        );
        let meta = JobMeta {
            version: Some("2.0.0".into()),
            module: "default".into(),
            options,
        };
        assert_eq!(meta.options.len(), 7);

        let device = DeviceInfo {
            version: "2.0.0".into(),
            model: Some("STM32F40xxx/41xxx".into()),
            hardware_id: Some("0x413".into()),
            serial_number: Some("0029003a3438510b32313336".into()),
            attributes: vec![("bootloader_version".into(), "3.1".into())],
        };
        assert_eq!(device.hardware_id.as_deref(), Some("0x413"));

        let problem = OptionProblem {
            name: Some("address".into()),
            message: "must be a multiple of 4".into(),
        };
        assert!(problem.name.is_some());

        let got = GattValue {
            characteristic: "8ec90001-f315-4f60-9fb8-838830daea50".into(),
            data: vec![0x60, 0x01, 0x01],
        };
        assert_eq!(got.data.len(), 3);

        for e in [
            LinkError::Unsupported("u".into()),
            LinkError::Closed("c".into()),
            LinkError::Timeout("t".into()),
            LinkError::NotFound("n".into()),
            LinkError::Invalid("i".into()),
            LinkError::Io("o".into()),
        ] {
            assert_eq!(link_error(&e).len(), 1);
        }
        assert_eq!(step(&FlashError::Options("bad".into())), -1);
        assert_eq!(step(&FlashError::Verify("bad".into())), -3);

        let _ = (
            LinkFeature::Configure,
            LinkFeature::ModemLines,
            LinkFeature::Reopen,
            LinkFeature::Gatt,
            GattDelivery::Notification,
            GattDelivery::Indication,
            GattWriteMode::WithResponse,
            ImageInfo {
                version: None,
                payload_size: 0,
                summary: String::new(),
            },
            FlashReport {
                bytes_sent: 0,
                retries: 0,
                summary: String::new(),
            },
        );
    }

    /// The host's side, as the host will implement it: every import of 0.2
    /// with the signature it has. Compiled, never run.
    #[allow(dead_code)]
    async fn imports<T: Host + HostLink>(t: &mut T, link: impl Fn() -> Resource<Link>) {
        let _: Result<(), LinkError> = t.reopen(link(), 30_000).await.unwrap();
        let _: bool = t.supports(link(), LinkFeature::Reopen).await.unwrap();
        let _: Result<(), LinkError> = t
            .gatt_write(link(), "fe59".into(), vec![1], GattWriteMode::WithResponse)
            .await
            .unwrap();
        let _: Result<Vec<u8>, LinkError> = t.gatt_read(link(), "2a24".into()).await.unwrap();
        let _: Result<(), LinkError> = t
            .gatt_subscribe(link(), "fe59".into(), GattDelivery::Indication)
            .await
            .unwrap();
        let _: Result<(), LinkError> = t.gatt_unsubscribe(link(), "fe59".into()).await.unwrap();
        let _: Result<Option<GattValue>, LinkError> = t.gatt_receive(link(), 1000).await.unwrap();
        let _: LinkKind = t.kind(link()).await.unwrap();
        t.progress(1, 2, Phase::Transfer).await.unwrap();
    }

    /// The plugin's side, as the host will call it. Compiled, never run.
    #[allow(dead_code)]
    async fn exports(
        plugin: &Guest,
        store: &mut wasmtime::Store<crate::plugin::PluginState>,
        options: Options,
    ) {
        let _: FamilyInfo = plugin.call_describe(&mut *store).await.unwrap();
        let _: Result<(), Vec<OptionProblem>> = plugin
            .call_check_options(&mut *store, &options)
            .await
            .unwrap();
    }
}
