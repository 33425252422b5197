//! An update expression under construction: SET and REMOVE clauses with their values, and the
//! clauses every status change needs (the sparse index key, the error attributes, a blob under
//! one of its two names).

use super::*;

/// An update expression under construction: SET and REMOVE clauses with their values.
#[derive(Default)]
pub(super) struct Update {
    set: Vec<String>,
    remove: Vec<&'static str>,
    pub(super) values: HashMap<String, AttributeValue>,
}

impl Update {
    pub(super) fn set(&mut self, clause: impl Into<String>) -> &mut Self {
        self.set.push(clause.into());
        self
    }
    pub(super) fn value(&mut self, name: &str, v: AttributeValue) -> &mut Self {
        self.values.insert(name.to_owned(), v);
        self
    }
    pub(super) fn remove(&mut self, attr: &'static str) -> &mut Self {
        self.remove.push(attr);
        self
    }
    /// Sets or removes the error attributes.
    pub(super) fn error(&mut self, error: Option<&SyncError>) -> &mut Self {
        match error {
            Some(e) => self
                .set("err_op = :err_op, err_code = :err_code, err_msg = :err_msg")
                .value(":err_op", s(&e.operation))
                .value(":err_code", s(&e.code))
                .value(":err_msg", s(&e.message)),
            None => self.remove("err_op").remove("err_code").remove("err_msg"),
        }
    }
    /// Sets a blob under one of its two names and removes the other.
    pub(super) fn blob(
        &mut self,
        (attr, value): (String, AttributeValue),
        base: &'static str,
        packed: &'static str,
    ) -> &mut Self {
        let placeholder = format!(":{attr}");
        self.set(format!("{attr} = {placeholder}")).value(&placeholder, value);
        self.remove(if attr == base { packed } else { base })
    }
    /// The status, and the sparse index key that follows it.
    pub(super) fn status(&mut self, status: Status) -> &mut Self {
        self.set("#s = :status").value(":status", s(status.as_str()));
        if status.is_open() {
            self.set("q = :status")
        } else {
            self.remove("q")
        }
    }
    /// The step the item now awaits, unclaimed (`transform`, `write`), or none. The Lambda
    /// stream filters match it, so a claim, a renewal or a completion (which remove it or leave
    /// it absent) wakes no consumer: each step is delivered once.
    pub(super) fn awaits(&mut self, step: Option<&'static str>) -> &mut Self {
        match step {
            Some(step) => self
                .set(format!("{} = :awaits", super::attr::AWAITS))
                .value(":awaits", s(step)),
            None => self.remove(super::attr::AWAITS),
        }
    }

    pub(super) fn expression(&self) -> String {
        let mut e = String::new();
        if !self.set.is_empty() {
            e.push_str("SET ");
            e.push_str(&self.set.join(", "));
        }
        if !self.remove.is_empty() {
            e.push_str(" REMOVE ");
            e.push_str(&self.remove.join(", "));
        }
        e
    }
}
