//! Hot reload of the merchant file (issue 22): a new [`MerchantSet`], validated whole by its
//! loader, replaces the policies of the merchants it names between two decisions. Counters,
//! originals, funds and stored answers stay. Each changed policy is journaled
//! ([`EventBody::PolicySet`], with a version per merchant) before it takes effect, so replay
//! decides nothing differently: it applies every later event under the policy in force then.
//!
//! What a reload may change: every policy knob (`reserve` of the file is the starting
//! reserve only; the live reserve moves by top-ups and settlements). What needs a restart:
//! adding or removing merchants or terminals (the ledger's books and indexes are built for a
//! fixed set) and a terminal's file `refund_enabled` (the admin API switches it live).

use super::event::{AdminId, EventBody, LedgerEvent, PolicyChange};
use super::merchants::{ConfigError, MerchantSet};
use super::{Ledger, MerchantId, Refused};
use crate::clock::UnixSeconds;

/// Why a reload did not apply.
#[derive(Debug)]
pub enum ReloadError<E> {
    /// The new set cannot replace the running one; nothing changed.
    Incompatible(ConfigError),
    /// `log` refused a policy event: the merchants before it changed, the rest did not.
    Log(E),
}

impl Ledger {
    /// Makes `set`'s policies the ones in force: each merchant whose policy differs, or whose
    /// policy was never journaled (version 0), gets a [`EventBody::PolicySet`] handed to
    /// `log` and then applied under its shard. Returns (merchant, new version) per change.
    /// Call it while no decision is in flight (the flow layer holds its gate exclusively),
    /// so that all merchants switch between the same two decisions.
    pub fn reload_logged<E>(
        &self,
        set: &MerchantSet,
        who: AdminId,
        now: UnixSeconds,
        mut log: impl FnMut(&LedgerEvent) -> Result<u64, E>,
    ) -> Result<Vec<(String, u32)>, ReloadError<E>> {
        self.compatible(set).map_err(ReloadError::Incompatible)?;
        let mut changed = Vec::new();
        for m in &set.merchants {
            let Some(id) = MerchantId::new(&m.id) else {
                continue;
            };
            let Some(mut book) = self.books.get_mut(&id) else {
                continue;
            };
            if book.policy_version > 0 && book.policy == m.policy {
                continue;
            }
            let version = book.policy_version.saturating_add(1);
            let event = LedgerEvent {
                merchant: id,
                at: now,
                body: EventBody::PolicySet(Box::new(PolicyChange {
                    version,
                    who,
                    policy: m.policy.clone(),
                })),
            };
            let seq = log(&event).map_err(ReloadError::Log)?;
            book.last_logged = seq;
            book.apply(now, &event.body);
            changed.push((m.id.clone(), version));
        }
        Ok(changed)
    }

    /// The policy version in force for `merchant` (0: never journaled).
    pub fn policy_version(&self, merchant: &str) -> Result<u32, Refused> {
        let id = MerchantId::new(merchant).ok_or(Refused(super::Reason::UNKNOWN_MERCHANT))?;
        self.books
            .get(&id)
            .map(|b| b.policy_version)
            .ok_or(Refused(super::Reason::UNKNOWN_MERCHANT))
    }

    /// The same merchants, in the same order, with the same terminals.
    fn compatible(&self, set: &MerchantSet) -> Result<(), ConfigError> {
        let refuse = |why: String| {
            Err(ConfigError(format!(
                "reload refused: {why}; restart to apply it"
            )))
        };
        let ids: Vec<&str> = set.merchants.iter().map(|m| m.id.as_str()).collect();
        let ours: Vec<&str> = self.order.iter().map(|id| id.as_str()).collect();
        if let Some(added) = ids.iter().find(|id| !ours.contains(id)) {
            return refuse(format!("merchant {added:?} is new"));
        }
        if let Some(gone) = ours.iter().find(|id| !ids.contains(id)) {
            return refuse(format!("merchant {gone:?} is gone"));
        }
        for m in &set.merchants {
            let Some(book) = MerchantId::new(&m.id).and_then(|id| self.books.get(&id)) else {
                return refuse(format!("merchant {:?} is new", m.id));
            };
            let same = m.terminals.len() == book.terms.len()
                && m.terminals
                    .iter()
                    .zip(&book.terms)
                    .all(|(t, b)| t.id == b.id.as_str());
            if !same {
                return refuse(format!("merchant {:?}: terminals differ", m.id));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ledger::{Operation, PanKey, Reason, Request};

    const T0: i64 = 1_769_871_600;

    fn set(cap: u64, offset: &str) -> MerchantSet {
        MerchantSet::from_toml_str(&format!(
            "[profiles.p]\nreserve = 1000000\nutc_offset = \"{offset}\"\ncurrency = 840\n\
             refund_single_max = {cap}\n\
             [[merchants]]\nid = \"M\"\nprofile = \"p\"\nterminals = [{{ id = \"T1\" }}]\n"
        ))
        .unwrap()
    }

    fn req(op: Operation, stan: u32, amount: u64, original: Option<u32>) -> Request<'static> {
        Request::test_ascii(op, stan, amount, original, 131)
    }

    fn who(s: &str) -> AdminId {
        AdminId::new(s).unwrap()
    }

    /// Journals every event into `events` (the journal of these tests).
    fn logger(
        events: &mut Vec<LedgerEvent>,
    ) -> impl FnMut(&LedgerEvent) -> Result<u64, Refused> + '_ {
        move |e| {
            events.push(e.clone());
            Ok(events.len() as u64)
        }
    }

    /// Reloads `l` with the one-merchant set of single refund cap `cap` (UTC), journaled.
    fn reload(l: &Ledger, cap: u64, by: &str, journal: &mut Vec<LedgerEvent>) {
        l.reload_logged(&set(cap, "+00:00"), who(by), T0, logger(journal))
            .unwrap();
    }

    #[test]
    fn a_reload_changes_the_next_decision_and_keeps_the_counters() {
        let l = Ledger::new(&set(5_000, "+00:00"), PanKey::new(&[1; 16]));
        let mut journal = Vec::new();
        l.reload_logged(
            &set(5_000, "+00:00"),
            who("startup"),
            T0,
            logger(&mut journal),
        )
        .unwrap();
        assert_eq!(
            l.policy_version("M").unwrap(),
            1,
            "the first policy is journaled"
        );
        assert_eq!(
            l.decide(&req(Operation::Sale, 1, 10_000, None), T0).reason,
            Reason::APPROVED
        );
        assert_eq!(
            l.decide(&req(Operation::Refund, 2, 4_000, Some(1)), T0)
                .reason,
            Reason::APPROVED
        );
        assert_eq!(
            l.decide(&req(Operation::Refund, 3, 4_500, Some(1)), T0)
                .reason,
            Reason::APPROVED
        );
        let changed = l
            .reload_logged(
                &set(1_000, "+00:00"),
                who("sighup"),
                T0,
                logger(&mut journal),
            )
            .unwrap();
        assert_eq!(changed, vec![("M".to_string(), 2)]);
        let d = l.decide(&req(Operation::Refund, 4, 1_001, Some(1)), T0);
        assert_eq!(d.reason, Reason::SINGLE_REFUND_CAP);
        let usage = l.usage("M", T0).unwrap();
        assert_eq!(
            (usage.day_amount, usage.day_count),
            (8_500, 2),
            "counters kept"
        );
        // The same file again changes nothing and journals nothing.
        let before = journal.len();
        let again = l
            .reload_logged(
                &set(1_000, "+00:00"),
                who("sighup"),
                T0,
                logger(&mut journal),
            )
            .unwrap();
        assert!(again.is_empty());
        assert_eq!(journal.len(), before);
    }

    #[test]
    fn a_set_with_another_merchant_or_terminal_is_refused_and_the_old_policy_stays() {
        let l = Ledger::new(&set(5_000, "+00:00"), PanKey::new(&[1; 16]));
        let other = MerchantSet::from_toml_str(
            "[profiles.p]\nrefund_single_max = 1\n[[merchants]]\nid = \"M\"\nprofile = \"p\"\n\
             terminals = [{ id = \"T1\" }, { id = \"T9\" }]\n",
        )
        .unwrap();
        let mut journal = Vec::new();
        let e = l
            .reload_logged(&other, who("api"), T0, logger(&mut journal))
            .unwrap_err();
        let ReloadError::Incompatible(e) = e else {
            panic!("incompatible expected");
        };
        assert!(e.0.contains("terminals differ"), "{e}");
        assert!(journal.is_empty());
        assert_eq!(
            l.decide(&req(Operation::Sale, 1, 10_000, None), T0).reason,
            Reason::APPROVED
        );
        assert_eq!(
            l.decide(&req(Operation::Refund, 2, 4_000, Some(1)), T0)
                .reason,
            Reason::APPROVED
        );
    }

    /// Replay with today's file: events before a reload are applied under the policy that was
    /// in force then (here the time zone, which decides the day a refund counts in).
    #[test]
    fn replay_applies_each_event_under_the_policy_journaled_before_it() {
        let first = set(5_000, "+00:00");
        let second = set(5_000, "+10:00");
        let l = Ledger::new(&first, PanKey::new(&[1; 16]));
        let mut journal = Vec::new();
        l.reload_logged(&first, who("startup"), T0, logger(&mut journal))
            .unwrap();
        // 23:00 UTC: day D under +00:00 (T0 is midnight UTC).
        let late = T0 + 23 * 3600;
        for (stan, r, at) in [
            (1, req(Operation::Sale, 1, 10_000, None), T0),
            (2, req(Operation::Refund, 2, 3_000, Some(1)), late),
        ] {
            let _ = stan;
            let logged = l.decide_logged(&r, at, logger(&mut journal));
            assert_eq!(logged.decision().unwrap().reason, Reason::APPROVED);
        }
        l.reload_logged(&second, who("sighup"), late, logger(&mut journal))
            .unwrap();
        // Restart with the second file: a fresh ledger from it, the journal replayed.
        let replayed = Ledger::new(&second, PanKey::new(&[1; 16]));
        for e in &journal {
            replayed.apply(e).unwrap();
        }
        assert_eq!(replayed.usage("M", late), l.usage("M", late));
        assert_eq!(replayed.policy_version("M").unwrap(), 2);
        // The refund counted on day D (+00:00); at 23:00 UTC it is already D+1 in +10:00.
        assert_eq!(l.usage("M", late).unwrap().day_amount, 0);
        // Without the policy events the refund would land on D+1 under +10:00: the events
        // are what keeps replay faithful.
        let naive = Ledger::new(&second, PanKey::new(&[1; 16]));
        for e in journal
            .iter()
            .filter(|e| !matches!(e.body, EventBody::PolicySet(_)))
        {
            naive.apply(e).unwrap();
        }
        assert_eq!(naive.usage("M", late).unwrap().day_amount, 3_000);
    }

    /// The policies a reload replaced stay readable by version (the decision trail of an
    /// older answer), through a snapshot and restore too, and only the last few are kept.
    #[test]
    fn replaced_policies_are_kept_by_version_through_a_snapshot_and_bounded() {
        use crate::ledger::book::POLICY_HISTORY_MAX;
        let l = Ledger::new(&set(5_000, "+00:00"), PanKey::new(&[1; 16]));
        let mut journal = Vec::new();
        reload(&l, 5_000, "startup", &mut journal);
        reload(&l, 1_000, "api", &mut journal);
        let cap = |p: Option<crate::ledger::Policy>| p.and_then(|p| p.refund_single_max);
        assert_eq!(cap(l.policy_at("M", 1)), Some(5_000));
        assert_eq!(cap(l.policy_at("M", 2)), Some(1_000));
        assert_eq!(cap(l.policy_at("M", 3)), None);
        let mut snap = Vec::new();
        l.snapshot(&mut snap);
        let restored =
            Ledger::restore(&set(7_000, "+00:00"), PanKey::new(&[1; 16]), &snap).unwrap();
        assert_eq!(cap(restored.policy_at("M", 1)), Some(5_000));
        assert_eq!(cap(restored.policy_at("M", 2)), Some(1_000));
        let mut again = Vec::new();
        restored.snapshot(&mut again);
        assert_eq!(snap, again, "restore then snapshot is the identity");

        for n in 0..POLICY_HISTORY_MAX as u64 + 2 {
            reload(&l, 2_000 + n, "api", &mut journal);
        }
        let newest = l.policy_version("M").unwrap();
        assert_eq!(
            cap(l.policy_at("M", newest)),
            Some(2_000 + POLICY_HISTORY_MAX as u64 + 1)
        );
        let kept = (1..newest)
            .filter(|v| l.policy_at("M", *v).is_some())
            .count();
        assert_eq!(kept, POLICY_HISTORY_MAX);
        assert_eq!(cap(l.policy_at("M", 1)), None, "the oldest went first");
    }
}
