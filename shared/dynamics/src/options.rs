//! The `[dataverse]` section of the configuration: the change-detection strategy, page size,
//! concurrency and the watermark's full-scan interval.

/// How changes are detected, chosen in the `[dataverse]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeDetection {
    /// Dataverse change tracking (delta links); needs change tracking enabled on the tables.
    ChangeTracking,
    /// `versionnumber gt N`, with a full id scan every `full_scan_every` polls for deletions.
    VersionWatermark,
    /// `modifiedon ge T` (deduplicated), with the same full scan.
    ModifiedOnWatermark,
}

/// The `[dataverse]` section of oppsync's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataverseOptions {
    pub change_detection: ChangeDetection,
    pub page_size: u32,
    pub concurrency: usize,
    /// With a watermark: scan every id for deletions once per this many polls.
    pub full_scan_every: u32,
    /// With a watermark: each poll reads again from where the watermark stood this long ago,
    /// so a row committed after a read with an earlier stamp (a long transaction) is not
    /// skipped. Repeats are free: the store's version guard drops them.
    pub watermark_overlap_seconds: u32,
}

impl Default for DataverseOptions {
    fn default() -> Self {
        DataverseOptions {
            change_detection: ChangeDetection::ChangeTracking,
            page_size: 5000,
            concurrency: 4,
            full_scan_every: 1440,
            // Sandboxed plug-ins time out after two minutes, which bounds how long a transaction
            // holds its rows' stamps before it commits; a minute more for clock skew.
            watermark_overlap_seconds: 180,
        }
    }
}

impl DataverseOptions {
    /// Reads and checks the `[dataverse]` table (absent: the defaults); each error names the key
    /// and the fix.
    pub fn from_toml(document: &str) -> Result<DataverseOptions, Vec<String>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Section {
            change_detection: Option<String>,
            page_size: Option<i64>,
            concurrency: Option<i64>,
            full_scan_every: Option<i64>,
            watermark_overlap_seconds: Option<i64>,
        }
        #[derive(serde::Deserialize)]
        struct Doc {
            dataverse: Option<Section>,
        }
        let doc: Doc = toml::from_str(document).map_err(|e| vec![format!("dataverse: {}", one_line(&e))])?;
        let Some(section) = doc.dataverse else {
            return Ok(DataverseOptions::default());
        };
        let mut errors = Vec::new();
        let mut options = DataverseOptions::default();
        match section.change_detection.as_deref() {
            None | Some("change_tracking") => {}
            Some("versionnumber") => options.change_detection = ChangeDetection::VersionWatermark,
            Some("modifiedon") => options.change_detection = ChangeDetection::ModifiedOnWatermark,
            Some(other) => errors.push(format!(
                "dataverse.change_detection: unknown strategy `{other}`. Fix: use \"change_tracking\" (needs change tracking enabled on opportunity and connection), \"versionnumber\" or \"modifiedon\""
            )),
        }
        match section.page_size {
            None => {}
            Some(n @ 1..=5000) => options.page_size = n as u32,
            Some(n) => errors.push(format!(
                "dataverse.page_size: {n} is outside 1..=5000. Fix: Dataverse serves at most 5000 rows a page; 5000 makes the fewest requests"
            )),
        }
        match section.concurrency {
            None => {}
            Some(n @ 1..=52) => options.concurrency = n as usize,
            Some(n) => errors.push(format!(
                "dataverse.concurrency: {n} is outside 1..=52. Fix: Dataverse allows 52 concurrent requests per user; 4 is plenty"
            )),
        }
        match section.full_scan_every {
            None => {}
            Some(n) if n >= 1 => options.full_scan_every = n as u32,
            Some(n) => errors.push(format!(
                "dataverse.full_scan_every: {n} must be at least 1. Fix: 1440 scans once a day at one poll a minute"
            )),
        }
        match section.watermark_overlap_seconds {
            None => {}
            Some(n @ 0..=86_400) => options.watermark_overlap_seconds = n as u32,
            Some(n) => errors.push(format!(
                "dataverse.watermark_overlap_seconds: {n} is outside 0..=86400. Fix: 180 covers Dataverse's two-minute plug-in transactions"
            )),
        }
        if errors.is_empty() { Ok(options) } else { Err(errors) }
    }

    /// Logs the strategy in use (operators need to know deletions come late with a watermark).
    pub fn log(&self) {
        match self.change_detection {
            ChangeDetection::ChangeTracking => {
                tracing::info!(
                    strategy = "change_tracking",
                    page_size = self.page_size,
                    "dataverse change detection"
                )
            }
            strategy => tracing::info!(
                strategy = if strategy == ChangeDetection::VersionWatermark {
                    "versionnumber"
                } else {
                    "modifiedon"
                },
                full_scan_every = self.full_scan_every,
                page_size = self.page_size,
                "dataverse change detection: watermark; deletions are found by the periodic full scan"
            ),
        }
    }
}

/// A TOML error on one line, with the line it points at (which names the key).
pub(crate) fn one_line(e: &toml::de::Error) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strategy_is_chosen_by_configuration_and_defaults_to_change_tracking() {
        assert_eq!(DataverseOptions::from_toml("").unwrap(), DataverseOptions::default());
        let o = DataverseOptions::from_toml("[dataverse]\nchange_detection = \"versionnumber\"\npage_size = 1000\n")
            .unwrap();
        assert_eq!(
            (o.change_detection, o.page_size),
            (ChangeDetection::VersionWatermark, 1000)
        );
        let o = DataverseOptions::from_toml("[dataverse]\nchange_detection = \"modifiedon\"\n").unwrap();
        assert_eq!(o.change_detection, ChangeDetection::ModifiedOnWatermark);
    }

    #[test]
    fn bad_options_are_errors_naming_the_key_and_the_fix() {
        let e = DataverseOptions::from_toml(
            "[dataverse]\nchange_detection = \"polling\"\npage_size = 9000\nconcurrency = 0\nfull_scan_every = 0\n",
        )
        .unwrap_err();
        assert_eq!(e.len(), 4);
        for (err, key) in e
            .iter()
            .zip(["change_detection", "page_size", "concurrency", "full_scan_every"])
        {
            assert!(
                err.starts_with(&format!("dataverse.{key}")) && err.contains("Fix:"),
                "{err}"
            );
        }
        assert!(DataverseOptions::from_toml("[dataverse]\npagesize = 1\n").unwrap_err()[0].contains("pagesize"));
    }
}
