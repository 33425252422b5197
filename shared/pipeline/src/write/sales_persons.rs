//! Sales persons: each opportunity's owner (a user), upserted before the opportunity that
//! names it, since Marketo refuses a whole opportunity call naming one it lacks (718).

use super::*;

/// What the cache compares: a changed email or name is written again.
fn content(person: &SalesPerson) -> (&Option<String>, &Option<String>, &Option<String>) {
    (&person.email, &person.first_name, &person.last_name)
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// The sales persons of the records `only` picks, to send (each once); the records whose
    /// sales person is in Marketo already are marked done. `fresh` sends even one this process
    /// wrote; `again` also one the record's last write left in Marketo (Marketo answered 718:
    /// it no longer has it).
    pub(crate) fn sales_persons_to_send(
        &self,
        works: &mut [Work],
        fresh: bool,
        again: bool,
        only: impl Fn(&Work) -> bool,
    ) -> Vec<Value> {
        let mut records: Vec<Value> = Vec::new();
        let mut seen = BTreeSet::new();
        for work in works.iter_mut().filter(|w| w.ok() && only(w)) {
            let Some(person) = sales_person_of(work).cloned() else {
                work.sales_person_done = true;
                continue;
            };
            let id = person.external_sales_person_id;
            let cached = !fresh && !work.state.rewrite && self.sales_persons.holds(id.0, &content(&person));
            if !again && (!work.sends_sales_person() || cached) {
                // In Marketo as planned since the record's last write, or written by this
                // process already. (A rewrite does not trust the cache: another process may
                // have written an older plan's sales person after this one wrote it.)
                work.sales_person_done = true;
                continue;
            }
            work.sales_person_done = false;
            if seen.insert(id) {
                let mut record = serde_json::Map::new();
                record.insert("externalSalesPersonId".into(), Value::String(id.to_string()));
                for (field, value) in [
                    ("email", &person.email),
                    ("firstName", &person.first_name),
                    ("lastName", &person.last_name),
                ] {
                    if let Some(value) = value {
                        record.insert(field.into(), Value::String(value.clone()));
                    }
                }
                records.push(Value::Object(record));
            }
        }
        records
    }

    /// Records Marketo's answer for the sales persons sent; returns the error when it stops
    /// the run.
    pub(crate) fn sales_persons_answered(
        &self,
        works: &mut [Work],
        records: &[Value],
        answered: Result<Vec<RecordOutcome>, MarketoError>,
        only: impl Fn(&Work) -> bool,
    ) -> Option<MarketoError> {
        let outcomes = match answered {
            Ok(o) => o,
            Err(e) => {
                let affected = works
                    .iter_mut()
                    .filter(|w| w.ok() && only(w) && !w.sales_person_done && sales_person_of(w).is_some());
                return Self::call_failed(e, Operation::SalesPersonSync.name(), affected);
            }
        };
        let by_id: HashMap<String, RecordOutcome> = records
            .iter()
            .zip(outcomes)
            .map(|(r, o)| (r["externalSalesPersonId"].as_str().unwrap_or_default().to_owned(), o))
            .collect();
        for work in works.iter_mut().filter(|w| w.ok() && only(w) && !w.sales_person_done) {
            let Some(person) = sales_person_of(work).cloned() else {
                continue;
            };
            let key = person.external_sales_person_id.to_string();
            let Some(outcome) = by_id.get(&key) else { continue };
            work.answers.push(Answer {
                operation: Operation::SalesPersonSync.name(),
                key,
                outcome: outcome.clone(),
            });
            if outcome.is_skipped() {
                // The opportunity names it, so it is not sent either: Marketo would refuse
                // its whole call (718), the other records with it.
                let (error, retryable) = skip_error(Operation::SalesPersonSync.name(), outcome);
                work.fail(error, retryable);
            } else {
                work.sales_person_done = true;
                work.touched = true;
                self.sales_persons
                    .remember(person.external_sales_person_id.0, &content(&person));
            }
        }
        None
    }

    /// Marketo refused an opportunity call with 718: it lacks a sales person the call names
    /// (deleted in Marketo since this process or the record's last write sent it). The call's
    /// sales persons are written again, uncached; those Marketo rejects fail their own records.
    pub(crate) async fn restore_sales_persons(
        &self,
        works: &mut [Work],
        sending: impl Fn(&Work) -> bool,
    ) -> Option<MarketoError> {
        for work in works.iter().filter(|w| sending(w)) {
            if let Some(person) = sales_person_of(work) {
                self.sales_persons.forget(person.external_sales_person_id.0);
            }
        }
        let records = self.sales_persons_to_send(works, true, true, &sending);
        if records.is_empty() {
            return None;
        }
        let answered = self.marketo.sync_sales_persons(&records).await;
        self.sales_persons_answered(works, &records, answered, &sending)
    }
}
