//! MQTT-style topic filters for routes: `+` matches one level, `#` (last) the rest, including the
//! level above it (`line3/#` matches `line3` too, as in MQTT).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    One,
    Rest,
}

impl TopicFilter {
    pub fn parse(filter: &str) -> Result<Self, String> {
        if filter.is_empty() {
            return Err("an empty filter matches nothing".into());
        }
        let parts: Vec<&str> = filter.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            levels.push(match *part {
                "+" => Level::One,
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => return Err(format!("{filter:?}: `#` must be the last level")),
                p if p.contains(['+', '#']) => {
                    return Err(format!("{filter:?}: `+` and `#` must fill a whole level"))
                }
                p => Level::Exact(p.to_owned()),
            });
        }
        Ok(TopicFilter { levels })
    }

    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('/');
        for level in &self.levels {
            match (level, parts.next()) {
                (Level::Rest, _) => return true,
                (Level::One, Some(_)) => {}
                (Level::Exact(e), Some(p)) if e == p => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_semantics() {
        let f = |s: &str| TopicFilter::parse(s).unwrap();
        assert!(f("line3/#").matches("line3/telemetry"));
        assert!(f("line3/#").matches("line3/a/b"));
        assert!(f("line3/#").matches("line3"));
        assert!(!f("line3/#").matches("line30/x"));
        assert!(f("+/telemetry").matches("line3/telemetry"));
        assert!(!f("+/telemetry").matches("line3/a/telemetry"));
        assert!(f("#").matches("anything/at/all"));
        assert!(f("a/b").matches("a/b") && !f("a/b").matches("a/b/c") && !f("a/b").matches("a"));
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b+").is_err());
        assert!(TopicFilter::parse("").is_err());
    }
}
