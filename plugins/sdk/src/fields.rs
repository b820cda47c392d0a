//! [`Fields`]: reading a family's settings out of checked [`Options`], for
//! [`crate::Family::settings`].
//!
//! What it is: typed getters that convert each value to the type the family
//! keeps it in, and collect a [`Problem`] (in the schema's one message
//! format) for every value that is missing, of another kind or does not fit,
//! and for every check the family adds ([`Fields::bad`]); [`Fields::finish`]
//! returns the settings or every problem.
//!
//! Options that went through [`crate::schema::check`] (or the gateway, which
//! checks them the same way) have a value for every option with a default,
//! of the option's kind and within its range; the getters' own problems
//! only show options that did not.

use crate::schema::{self, OptionSpec, OptionValue, Options, Problem};

/// The options of one device, being read into settings.
#[derive(Debug)]
pub struct Fields<'a> {
    specs: &'a [OptionSpec],
    options: &'a Options,
    problems: Vec<Problem>,
}

impl<'a> Fields<'a> {
    /// `options`, checked against `specs` (the family's schema).
    pub fn new(specs: &'a [OptionSpec], options: &'a Options) -> Fields<'a> {
        Fields {
            specs,
            options,
            problems: Vec::new(),
        }
    }

    /// The value of `name` picked by `pick`; a problem when it is absent
    /// and `required`, or of another kind.
    fn read<T>(
        &mut self,
        name: &str,
        required: bool,
        kind: &str,
        pick: impl FnOnce(&'a OptionValue) -> Option<T>,
    ) -> Option<T> {
        let options: &'a Options = self.options;
        match options.get(name) {
            Some(value) => {
                let picked = pick(value);
                if picked.is_none() {
                    self.problems.push(Problem::new(
                        Some(name),
                        format!(
                            "option `{name}`: expected a value of kind {kind}, got one of kind {}",
                            value.kind_name()
                        ),
                    ));
                }
                picked
            }
            None if required => {
                self.problems.push(Problem::new(
                    Some(name),
                    format!("option `{name}` has no value"),
                ));
                None
            }
            None => None,
        }
    }

    /// A whole number as `T`; a problem when it does not fit `T`.
    fn convert<T: TryFrom<i64>>(&mut self, name: &str, n: i64) -> Option<T> {
        let t = T::try_from(n).ok();
        if t.is_none() {
            self.bad(name, "out of range");
        }
        t
    }

    /// A `boolean` option with a default.
    pub fn boolean(&mut self, name: &str) -> bool {
        self.read(name, true, "boolean", |v| match v {
            OptionValue::Boolean(b) => Some(*b),
            _ => None,
        })
        .unwrap_or_default()
    }

    /// An `integer` option with a default, as `T`.
    pub fn integer<T: TryFrom<i64> + Default>(&mut self, name: &str) -> T {
        self.optional_integer(name, true).unwrap_or_default()
    }

    /// An `integer` option without a default, as `T`: none when not set.
    /// With `required`, a problem when not set.
    pub fn optional_integer<T: TryFrom<i64>>(&mut self, name: &str, required: bool) -> Option<T> {
        let n = self.read(name, required, "integer", |v| match v {
            OptionValue::Integer(n) => Some(*n),
            _ => None,
        })?;
        self.convert(name, n)
    }

    /// A `duration` option with a default, in milliseconds.
    pub fn duration_ms(&mut self, name: &str) -> u32 {
        let ms = self.read(name, true, "duration", |v| match v {
            OptionValue::Duration(ms) => Some(*ms),
            _ => None,
        });
        ms.and_then(|ms| self.convert(name, i64::try_from(ms).unwrap_or(i64::MAX)))
            .unwrap_or_default()
    }

    /// A `choice` option with a default: its value (never an alias).
    pub fn choice(&mut self, name: &str) -> &'a str {
        self.read(name, true, "choice", |v| match v {
            OptionValue::Choice(c) => Some(c.as_str()),
            _ => None,
        })
        .unwrap_or_default()
    }

    /// A `text` option with a default.
    pub fn text(&mut self, name: &str) -> &'a str {
        self.optional_text(name).unwrap_or_default()
    }

    /// A `text` option without a default: none when not set.
    pub fn optional_text(&mut self, name: &str) -> Option<&'a str> {
        self.read(name, false, "text", |v| match v {
            OptionValue::Text(t) => Some(t.as_str()),
            _ => None,
        })
    }

    /// A `bytes` option without a default: none when not set or empty.
    pub fn optional_bytes(&mut self, name: &str) -> Option<Vec<u8>> {
        self.read(name, false, "bytes", |v| match v {
            OptionValue::Bytes(b) => Some(b.as_slice()),
            _ => None,
        })
        .filter(|b| !b.is_empty())
        .map(<[u8]>::to_vec)
    }

    /// A `size` option without a default: none when not set.
    pub fn optional_size(&mut self, name: &str) -> Option<u64> {
        self.read(name, false, "size", |v| match v {
            OptionValue::Size(n) => Some(*n),
            _ => None,
        })
    }

    /// The value of `name` is not one the family can use, `why` says why:
    /// a problem in the one format, naming the option and its value.
    pub fn bad(&mut self, name: &str, why: &str) {
        let spec = self.specs.iter().find(|s| s.name == name);
        let problem = match (spec, self.options.get(name)) {
            (Some(spec), Some(value)) => Problem::bad_value(spec, &schema::shown(spec, value), why),
            _ => Problem::new(Some(name), format!("option `{name}`: {why}")),
        };
        self.problems.push(problem);
    }

    /// `settings` when no getter or check found a problem, else every problem.
    pub fn finish<S>(self, settings: S) -> Result<S, Vec<Problem>> {
        if self.problems.is_empty() {
            Ok(settings)
        } else {
            Err(self.problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<OptionSpec> {
        vec![
            OptionSpec::integer("retries", 0, 1000, "re-sends").default_int(10),
            OptionSpec::duration("wait_ms", 10, 60_000, "a wait").default_duration_ms(500),
            OptionSpec::text("name", "a name"),
        ]
    }

    #[test]
    fn values_come_typed_and_checks_use_the_one_format() {
        let specs = specs();
        let options = schema::check(&specs, &[("name".into(), "".into())]).unwrap();
        let mut f = Fields::new(&specs, &options);
        assert_eq!(f.integer::<u32>("retries"), 10);
        assert_eq!(f.duration_ms("wait_ms"), 500);
        assert_eq!(f.optional_text("name"), Some(""));
        f.bad("name", "must not be empty");
        let problems = f.finish(()).unwrap_err();
        assert_eq!(
            problems[0].message,
            "option `name` = \"\": must not be empty (a name)"
        );
    }

    #[test]
    fn options_that_skipped_the_schema_are_problems() {
        let specs = specs();
        let options = Options::new(vec![
            ("retries".into(), OptionValue::Integer(-1)),
            ("name".into(), OptionValue::Boolean(true)),
        ]);
        let mut f = Fields::new(&specs, &options);
        assert_eq!(f.integer::<u32>("retries"), 0);
        assert_eq!(f.duration_ms("wait_ms"), 0);
        assert_eq!(f.optional_text("name"), None);
        let problems = f.finish(()).unwrap_err();
        let options: Vec<_> = problems.iter().map(|p| p.option.as_deref()).collect();
        assert_eq!(
            options,
            vec![Some("retries"), Some("wait_ms"), Some("name")]
        );
    }
}
