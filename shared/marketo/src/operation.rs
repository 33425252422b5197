//! Every Marketo call oppsync makes, with the one name it goes by everywhere: the client's
//! errors, the call counters and metrics (`MarketoCalls.<name>`), the error ledger, the
//! simulator's counters, the CLI's reports and the README.

use std::fmt;

/// A Marketo REST call (or the identity call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Identity,
    OpportunitySync,
    OpportunityDelete,
    OpportunityQuery,
    OpportunityDescribe,
    RoleSync,
    RoleDelete,
    RoleQuery,
    RoleDescribe,
    CompanySync,
    CompanyQuery,
    SalesPersonSync,
    SalesPersonQuery,
    SalesPersonDescribe,
    LeadQuery,
    LeadSync,
    Usage,
}

impl Operation {
    /// Every operation, in the order reports list them.
    pub const ALL: [Operation; 17] = [
        Operation::Identity,
        Operation::CompanySync,
        Operation::CompanyQuery,
        Operation::SalesPersonSync,
        Operation::SalesPersonQuery,
        Operation::SalesPersonDescribe,
        Operation::LeadQuery,
        Operation::LeadSync,
        Operation::OpportunitySync,
        Operation::OpportunityDelete,
        Operation::OpportunityQuery,
        Operation::OpportunityDescribe,
        Operation::RoleSync,
        Operation::RoleDelete,
        Operation::RoleQuery,
        Operation::RoleDescribe,
        Operation::Usage,
    ];

    /// The operation's one name: `<object>.<verb>`.
    pub const fn name(self) -> &'static str {
        match self {
            Operation::Identity => "identity",
            Operation::OpportunitySync => "opportunities.sync",
            Operation::OpportunityDelete => "opportunities.delete",
            Operation::OpportunityQuery => "opportunities.query",
            Operation::OpportunityDescribe => "opportunities.describe",
            Operation::RoleSync => "roles.sync",
            Operation::RoleDelete => "roles.delete",
            Operation::RoleQuery => "roles.query",
            Operation::RoleDescribe => "roles.describe",
            Operation::CompanySync => "companies.sync",
            Operation::CompanyQuery => "companies.query",
            Operation::SalesPersonSync => "salespersons.sync",
            Operation::SalesPersonQuery => "salespersons.query",
            Operation::SalesPersonDescribe => "salespersons.describe",
            Operation::LeadQuery => "leads.query",
            Operation::LeadSync => "leads.sync",
            Operation::Usage => "stats.usage",
        }
    }

    /// Whether a call counts against Marketo's quota and rate limit (identity calls do not).
    pub const fn is_rest(self) -> bool {
        !matches!(self, Operation::Identity)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_one_distinct_name() {
        let mut names: Vec<&str> = Operation::ALL.iter().map(|o| o.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Operation::ALL.len());
    }
}
