//! The merchant set: profiles, merchants and terminals from TOML (DOMAIN §4), validated once.
//!
//! Every knob of a profile can be overridden by a merchant. Absent limits mean "no limit";
//! absent switches take the defaults of [`Policy::default`]. Errors are one line that names
//! the place, e.g. `merchants[2].terminals[1]: duplicate terminal id "10000001"`.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Deserialize;

use super::money::{CardType, UtcOffset};

/// The sample merchant set shipped with refundgate (`fixtures/merchants.toml`).
pub const EMBEDDED_MERCHANTS_TOML: &str = include_str!("../../fixtures/merchants.toml");

/// Whether a refund of a sale from the same day and open batch is allowed or must be a void.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SameDayRefund {
    /// Same-day refunds are fine.
    #[default]
    Allow,
    /// Same-day, same-batch refunds are declined `USE_VOID`.
    UseVoid,
}

/// The resolved refund/void policy of one merchant (profile + overrides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Refunds allowed at all.
    pub refund_enabled: bool,
    /// Voids allowed at all.
    pub void_enabled: bool,
    /// Days after the sale during which it may be refunded (default 180).
    pub refund_window_days: u32,
    /// Largest single refund.
    pub refund_single_max: Option<u64>,
    /// Refund amount per merchant-local day.
    pub refund_day_amount_max: Option<u64>,
    /// Refund amount per merchant-local month.
    pub refund_month_amount_max: Option<u64>,
    /// Refunds per merchant-local day.
    pub refund_day_count_max: Option<u32>,
    /// Refunds per merchant-local month.
    pub refund_month_count_max: Option<u32>,
    /// Refund amount per card per day.
    pub card_refund_day_amount_max: Option<u64>,
    /// Refunds per card per day.
    pub card_refund_day_count_max: Option<u32>,
    /// Refunds against one sale.
    pub original_refund_count_max: Option<u32>,
    /// At most this share (1–100) of a sale may be refunded in total.
    pub refundable_share_percent: u8,
    /// Same-day refund policy.
    pub same_day_refund: SameDayRefund,
    /// Card types that may not receive refunds.
    pub denied_card_types: Vec<CardType>,
    /// Prefunded amount that backs refunds after settlement.
    pub reserve: u64,
    /// Merchant-local time zone.
    pub utc_offset: UtcOffset,
    /// ISO 4217 numeric currency of the merchant (DE49); requests in another currency get 13.
    pub currency: u16,
    /// Merchant-local time of day (seconds after midnight) at which a scheduled cut-over
    /// settles every terminal's batch (DOMAIN §9a); `None`: no schedule.
    pub cutover_at: Option<u32>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            refund_enabled: true,
            void_enabled: true,
            refund_window_days: 180,
            refund_single_max: None,
            refund_day_amount_max: None,
            refund_month_amount_max: None,
            refund_day_count_max: None,
            refund_month_count_max: None,
            card_refund_day_amount_max: None,
            card_refund_day_count_max: None,
            original_refund_count_max: None,
            refundable_share_percent: 100,
            same_day_refund: SameDayRefund::Allow,
            denied_card_types: Vec::new(),
            reserve: 0,
            utc_offset: UtcOffset::default(),
            currency: 840,
            cutover_at: None,
        }
    }
}

/// A terminal of a merchant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalConfig {
    /// DE41, up to 8 characters.
    pub id: String,
    /// False disables refunds on this terminal only.
    pub refund_enabled: bool,
    /// The CUP batch number this terminal starts in (sign-on returns it; settlement moves it on).
    pub batch: u32,
}

/// One merchant with its resolved policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerchantConfig {
    /// DE42, up to 15 characters.
    pub id: String,
    /// Name of the profile it was defaulted from.
    pub profile: String,
    /// Profile knobs with this merchant's overrides applied.
    pub policy: Policy,
    /// Its terminals, in file order.
    pub terminals: Vec<TerminalConfig>,
}

/// The validated merchant set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MerchantSet {
    /// Merchants in file order.
    pub merchants: Vec<MerchantConfig>,
}

/// A merchant file that cannot be used; the message is one line naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Every knob, all optional: used for profiles and merchant overrides alike.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Knobs {
    refund_enabled: Option<bool>,
    void_enabled: Option<bool>,
    refund_window_days: Option<u32>,
    refund_single_max: Option<u64>,
    refund_day_amount_max: Option<u64>,
    refund_month_amount_max: Option<u64>,
    refund_day_count_max: Option<u32>,
    refund_month_count_max: Option<u32>,
    card_refund_day_amount_max: Option<u64>,
    card_refund_day_count_max: Option<u32>,
    original_refund_count_max: Option<u32>,
    refundable_share_percent: Option<u8>,
    same_day_refund: Option<SameDayRefund>,
    denied_card_types: Option<Vec<CardType>>,
    reserve: Option<u64>,
    utc_offset: Option<String>,
    currency: Option<u16>,
    cutover_at: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TerminalFile {
    id: String,
    refund_enabled: Option<bool>,
    batch: Option<u32>,
}

impl MerchantSet {
    /// The embedded sample set (`fixtures/merchants.toml`).
    pub fn embedded() -> Result<MerchantSet, ConfigError> {
        MerchantSet::from_toml_str(EMBEDDED_MERCHANTS_TOML)
    }

    /// Reads and validates a merchant file.
    pub fn from_path(path: &Path) -> Result<MerchantSet, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        MerchantSet::from_toml_str(&text)
    }

    /// Parses and validates merchant-file text.
    pub fn from_toml_str(text: &str) -> Result<MerchantSet, ConfigError> {
        let root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError(one_line(&e.to_string())))?;
        for key in root.keys() {
            if key != "profiles" && key != "merchants" {
                return Err(ConfigError(format!("unknown key \"{key}\"")));
            }
        }
        let profiles = parse_profiles(root.get("profiles"))?;
        let list = match root.get("merchants") {
            None => return Ok(MerchantSet::default()),
            Some(toml::Value::Array(a)) => a,
            Some(_) => return Err(ConfigError("merchants: expected an array of tables".into())),
        };
        let mut seen = HashSet::new();
        let mut merchants = Vec::with_capacity(list.len());
        for (i, value) in list.iter().enumerate() {
            let m = parse_merchant(&format!("merchants[{i}]"), value, &profiles)?;
            if !seen.insert(m.id.clone()) {
                return Err(ConfigError(format!(
                    "merchants[{i}]: duplicate merchant id \"{}\"",
                    m.id
                )));
            }
            merchants.push(m);
        }
        Ok(MerchantSet { merchants })
    }

    /// The merchant with DE42 `id`.
    pub fn merchant(&self, id: &str) -> Option<&MerchantConfig> {
        self.merchants.iter().find(|m| m.id == id)
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_profiles(v: Option<&toml::Value>) -> Result<BTreeMap<String, Knobs>, ConfigError> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    let toml::Value::Table(t) = v else {
        return Err(ConfigError("profiles: expected a table".into()));
    };
    let mut out = BTreeMap::new();
    for (name, body) in t {
        let knobs = Knobs::deserialize(body.clone())
            .map_err(|e| ConfigError(format!("profiles.{name}: {}", one_line(&e.to_string()))))?;
        // Validate the profile on its own too, so a bad profile is named as such.
        resolve(&format!("profiles.{name}"), &Knobs::default(), &knobs)?;
        out.insert(name.clone(), knobs);
    }
    Ok(out)
}

fn parse_merchant(
    at: &str,
    value: &toml::Value,
    profiles: &BTreeMap<String, Knobs>,
) -> Result<MerchantConfig, ConfigError> {
    let toml::Value::Table(t) = value else {
        return Err(ConfigError(format!("{at}: expected a table")));
    };
    let mut t = t.clone();
    let id = match t.remove("id") {
        Some(toml::Value::String(s)) => s,
        Some(_) => return Err(ConfigError(format!("{at}.id: expected a string"))),
        None => return Err(ConfigError(format!("{at}: missing key \"id\""))),
    };
    if id.is_empty() || id.len() > 15 || !id.is_ascii() {
        return Err(ConfigError(format!(
            "{at}.id: \"{id}\" is not a DE42 merchant id (1-15 ASCII characters)"
        )));
    }
    let (profile, base) = match t.remove("profile") {
        None => (String::new(), Knobs::default()),
        Some(toml::Value::String(p)) => match profiles.get(&p) {
            Some(k) => (p.clone(), k.clone()),
            None => {
                return Err(ConfigError(format!(
                    "{at}.profile: unknown profile \"{p}\""
                )))
            }
        },
        Some(_) => return Err(ConfigError(format!("{at}.profile: expected a string"))),
    };
    let terminals = parse_terminals(at, t.remove("terminals"))?;
    let overrides = Knobs::deserialize(toml::Value::Table(t))
        .map_err(|e| ConfigError(format!("{at}: {}", one_line(&e.to_string()))))?;
    let policy = resolve(at, &base, &overrides)?;
    Ok(MerchantConfig {
        id,
        profile,
        policy,
        terminals,
    })
}

fn parse_terminals(at: &str, v: Option<toml::Value>) -> Result<Vec<TerminalConfig>, ConfigError> {
    let list = match v {
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(a)) => a,
        Some(_) => return Err(ConfigError(format!("{at}.terminals: expected an array"))),
    };
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for (j, tv) in list.into_iter().enumerate() {
        let here = format!("{at}.terminals[{j}]");
        let tf = TerminalFile::deserialize(tv)
            .map_err(|e| ConfigError(format!("{here}: {}", one_line(&e.to_string()))))?;
        if tf.id.is_empty() || tf.id.len() > 8 || !tf.id.is_ascii() {
            return Err(ConfigError(format!(
                "{here}.id: \"{}\" is not a DE41 terminal id (1-8 ASCII characters)",
                tf.id
            )));
        }
        let batch = tf.batch.unwrap_or(1);
        if batch > 999_999 {
            return Err(ConfigError(format!("{here}.batch: {batch} is over 999999")));
        }
        if !seen.insert(tf.id.clone()) {
            return Err(ConfigError(format!(
                "{here}: duplicate terminal id \"{}\"",
                tf.id
            )));
        }
        out.push(TerminalConfig {
            id: tf.id,
            refund_enabled: tf.refund_enabled.unwrap_or(true),
            batch,
        });
    }
    if out.len() > usize::from(u16::MAX) {
        return Err(ConfigError(format!(
            "{at}.terminals: more than 65535 terminals"
        )));
    }
    Ok(out)
}

/// Applies `over` on top of `base` on top of the defaults, checking every value.
fn resolve(at: &str, base: &Knobs, over: &Knobs) -> Result<Policy, ConfigError> {
    let d = Policy::default();
    macro_rules! pick {
        ($f:ident) => {
            over.$f.clone().or_else(|| base.$f.clone())
        };
    }
    let share = pick!(refundable_share_percent).unwrap_or(d.refundable_share_percent);
    if share == 0 || share > 100 {
        return Err(ConfigError(format!(
            "{at}.refundable_share_percent: {share} is not within 1..=100"
        )));
    }
    let offset_text = pick!(utc_offset);
    let utc_offset = match offset_text.as_deref() {
        None => d.utc_offset,
        Some(s) => UtcOffset::parse(s).ok_or_else(|| {
            ConfigError(format!(
                "{at}.utc_offset: \"{s}\" is not an offset like \"+08:00\""
            ))
        })?,
    };
    let cutover_at = match pick!(cutover_at).as_deref() {
        None => None,
        Some(s) => Some(parse_time_of_day(s).ok_or_else(|| {
            ConfigError(format!(
                "{at}.cutover_at: \"{s}\" is not a local time like \"23:00\""
            ))
        })?),
    };
    let currency = pick!(currency).unwrap_or(d.currency);
    if currency == 0 || currency > 999 {
        return Err(ConfigError(format!(
            "{at}.currency: {currency} is not an ISO 4217 numeric code"
        )));
    }
    let money = [
        ("refund_single_max", pick!(refund_single_max)),
        ("refund_day_amount_max", pick!(refund_day_amount_max)),
        ("refund_month_amount_max", pick!(refund_month_amount_max)),
        (
            "card_refund_day_amount_max",
            pick!(card_refund_day_amount_max),
        ),
        ("reserve", pick!(reserve)),
    ];
    for (name, v) in money {
        if let Some(v) = v {
            if v > super::money::AMOUNT_MINOR_MAX {
                return Err(ConfigError(format!(
                    "{at}.{name}: {v} is over 999999999999"
                )));
            }
        }
    }
    if let Some(n) = pick!(original_refund_count_max) {
        if n > u32::from(u16::MAX) {
            return Err(ConfigError(format!(
                "{at}.original_refund_count_max: {n} is over 65535"
            )));
        }
    }
    let window = pick!(refund_window_days).unwrap_or(d.refund_window_days);
    if window > 3650 {
        return Err(ConfigError(format!(
            "{at}.refund_window_days: {window} is over 3650"
        )));
    }
    Ok(Policy {
        refund_enabled: pick!(refund_enabled).unwrap_or(d.refund_enabled),
        void_enabled: pick!(void_enabled).unwrap_or(d.void_enabled),
        refund_window_days: window,
        refund_single_max: pick!(refund_single_max),
        refund_day_amount_max: pick!(refund_day_amount_max),
        refund_month_amount_max: pick!(refund_month_amount_max),
        refund_day_count_max: pick!(refund_day_count_max),
        refund_month_count_max: pick!(refund_month_count_max),
        card_refund_day_amount_max: pick!(card_refund_day_amount_max),
        card_refund_day_count_max: pick!(card_refund_day_count_max),
        original_refund_count_max: pick!(original_refund_count_max),
        refundable_share_percent: share,
        same_day_refund: pick!(same_day_refund).unwrap_or_default(),
        denied_card_types: pick!(denied_card_types).unwrap_or_default(),
        reserve: pick!(reserve).unwrap_or(0),
        utc_offset,
        currency,
        cutover_at,
    })
}

/// `HH:MM` (00:00–23:59) as seconds after midnight.
fn parse_time_of_day(s: &str) -> Option<u32> {
    let b = s.as_bytes();
    if b.len() != 5 || b[2] != b':' || !s.is_ascii() {
        return None;
    }
    let hh: u32 = s.get(0..2)?.parse().ok()?;
    let mm: u32 = s.get(3..5)?.parse().ok()?;
    (hh < 24 && mm < 60).then_some(hh * 3600 + mm * 60)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn embedded_set_loads_and_has_the_vector_ids() {
        let set = MerchantSet::embedded().unwrap();
        let ascii = set.merchant("MERCHANT 000001").unwrap();
        assert_eq!(ascii.policy.currency, 840);
        assert!(ascii.terminals.iter().any(|t| t.id == "TERM0001"));
        let cup = set.merchant("898310048990001").unwrap();
        assert_eq!(cup.policy.currency, 156);
        assert_eq!(cup.policy.utc_offset.seconds(), 8 * 3600);
        assert!(cup.terminals.iter().any(|t| t.id == "10000001"));
    }

    fn err(text: &str) -> String {
        MerchantSet::from_toml_str(text).unwrap_err().0
    }

    #[test]
    fn bad_files_give_one_line_naming_the_key() {
        let e = err("[[merchants]]\nid = \"M1\"\nterminals = [{ id = \"T1\" }, { id = \"T1\" }]\n");
        assert_eq!(e, "merchants[0].terminals[1]: duplicate terminal id \"T1\"");
        let e = err("[[merchants]]\nid = \"M1\"\n[[merchants]]\nid = \"M1\"\n");
        assert_eq!(e, "merchants[1]: duplicate merchant id \"M1\"");
        let e = err("[profiles.p]\nrefundable_share_percent = 101\n");
        assert_eq!(
            e,
            "profiles.p.refundable_share_percent: 101 is not within 1..=100"
        );
        let e = err("[[merchants]]\nid = \"M1\"\nutc_offset = \"8\"\n");
        assert!(e.starts_with("merchants[0].utc_offset:"), "{e}");
        let e = err("[[merchants]]\nid = \"M1\"\nrefund_limit = 5\n");
        assert!(
            e.starts_with("merchants[0]: unknown field `refund_limit`"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let e = err("[[merchants]]\nid = \"M1\"\nprofile = \"nope\"\n");
        assert_eq!(e, "merchants[0].profile: unknown profile \"nope\"");
        let e = err("[[merchants]]\nid = \"M1\"\nterminals = [{ id = \"T1\", color = 1 }]\n");
        assert!(
            e.starts_with("merchants[0].terminals[0]: unknown field `color`"),
            "{e}"
        );
        let e = err("other = 1\n");
        assert_eq!(e, "unknown key \"other\"");
        let e = err("[[merchants]]\nid = \"M1\"\nsame_day_refund = \"sometimes\"\n");
        assert!(
            e.starts_with("merchants[0]: unknown variant `sometimes`"),
            "{e}"
        );
    }

    #[test]
    fn merchant_overrides_win_over_the_profile() {
        let set = MerchantSet::from_toml_str(
            "[profiles.s]\nrefund_day_count_max = 20\nreserve = 7\n[[merchants]]\nid = \"M\"\nprofile = \"s\"\nrefund_day_count_max = 5\n",
        )
        .unwrap();
        let p = &set.merchants[0].policy;
        assert_eq!(p.refund_day_count_max, Some(5));
        assert_eq!(p.reserve, 7);
    }
}
