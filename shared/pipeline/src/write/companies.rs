//! Companies: each opportunity's account, upserted before the opportunity that names it.

use super::*;

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// The companies to send (each once), marking the records whose company is in Marketo
    /// already as done.
    pub(crate) fn companies_to_send(&self, works: &mut [Work], fresh: bool) -> Vec<Value> {
        let mut records: Vec<Value> = Vec::new();
        let mut seen = BTreeSet::new();
        for work in works.iter_mut().filter(|w| w.ok()) {
            if !work.sends_company() {
                // In Marketo as planned since the record's last write.
                work.company_done = true;
                continue;
            }
            if let Action::Upsert(desired) = &work.plan.action
                && let Some(company) = &desired.company
                && !fresh
                && !work.state.rewrite
                && self.companies.holds(company.external_company_id.0, &company.name)
            {
                // Written by this process already, with this name. (Not for a rewrite: Marketo
                // may differ from what this process wrote, since another process may have
                // written an older plan's company after it.)
                work.company_done = true;
                continue;
            }
            if let Action::Upsert(desired) = &work.plan.action
                && let Some(company) = &desired.company
                && seen.insert(company.external_company_id)
            {
                let mut record = serde_json::Map::new();
                record.insert(
                    "externalCompanyId".into(),
                    Value::String(company.external_company_id.to_string()),
                );
                if let Some(name) = &company.name {
                    record.insert("company".into(), Value::String(name.clone()));
                }
                records.push(Value::Object(record));
            }
        }
        records
    }

    /// Records Marketo's answer for the companies sent; returns the error when it stops the run.
    pub(crate) fn companies_answered(
        &self,
        works: &mut [Work],
        records: &[Value],
        answered: Result<Vec<RecordOutcome>, MarketoError>,
    ) -> Option<MarketoError> {
        let outcomes = match answered {
            Ok(o) => o,
            Err(e) => {
                let affected = works
                    .iter_mut()
                    .filter(|w| w.ok() && !w.company_done && company_of(w).is_some());
                return Self::call_failed(e, Operation::CompanySync.name(), affected);
            }
        };
        let by_id: HashMap<String, RecordOutcome> = records
            .iter()
            .zip(outcomes)
            .map(|(r, o)| (r["externalCompanyId"].as_str().unwrap_or_default().to_owned(), o))
            .collect();
        for work in works.iter_mut().filter(|w| w.ok() && !w.company_done) {
            let Some(company) = company_of(work) else { continue };
            let Some(outcome) = by_id.get(&company) else { continue };
            work.answers.push(Answer {
                operation: Operation::CompanySync.name(),
                key: company.clone(),
                outcome: outcome.clone(),
            });
            if outcome.is_skipped() {
                let (error, retryable) = skip_error(Operation::CompanySync.name(), outcome);
                work.fail(error, retryable);
            } else {
                work.company_done = true;
                work.touched = true;
                if let Action::Upsert(Desired { company: Some(c), .. }) = &work.plan.action {
                    self.companies.remember(c.external_company_id.0, &c.name);
                }
            }
        }
        None
    }
}
