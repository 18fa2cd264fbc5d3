//! Reading the config: the main file, the drop-ins and the `--set` overrides deep-merged
//! into one TOML table (remembering which source set each key), then deserialized into
//! [`Config`]. Errors name the source and the key; unknown keys and enum spellings get a
//! "did you mean" hint from the names the schema types accept (see `keys`).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::keys::{known_keys, shape, Shape};
use super::{Config, ConfigError, Origin, DROP_IN_DIR};

/// Loads the config: `path`, then `config.d/*.toml` next to it in name order, then the
/// `--set key.path=value` overrides; deserializes and validates the result. Relative paths in
/// the returned config are already resolved against `path`'s directory.
pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
    let mut merged = toml::Table::new();
    let mut origins = Origins::default();
    let mut sources = Vec::new();

    let main = read_table(path)?;
    let main_origin = Origin::File(path.to_path_buf());
    merge(
        &mut merged,
        main,
        &mut Vec::new(),
        &main_origin,
        &mut origins,
    );
    sources.push(main_origin.clone());

    let dir = path.parent().unwrap_or(Path::new(""));
    for drop_in in drop_in_files(&dir.join(DROP_IN_DIR))? {
        let table = read_table(&drop_in)?;
        let origin = Origin::File(drop_in);
        merge(&mut merged, table, &mut Vec::new(), &origin, &mut origins);
        sources.push(origin);
    }

    for arg in overrides {
        let (key, value) = parse_override(arg)?;
        let origin = Origin::Override { key: key.join(".") };
        set_override(&mut merged, &key, value, arg)?;
        origins.set(&key, origin.clone());
        sources.push(origin);
    }

    let mut config = deserialize(merged, &origins, &main_origin)?;
    config.validate().map_err(|(key, message)| {
        let segments: Vec<String> = key.split('.').map(str::to_string).collect();
        ConfigError::Invalid {
            origin: origins.lookup(&segments).unwrap_or(&main_origin).clone(),
            key,
            message,
        }
    })?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    config.base_dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    config.sources = sources;
    config.resolve_paths_in_place();
    config.check_secret_files().map_err(|(key, message)| {
        let segments: Vec<String> = key.split('.').map(str::to_string).collect();
        ConfigError::Invalid {
            origin: origins.lookup(&segments).unwrap_or(&main_origin).clone(),
            key,
            message,
        }
    })?;
    Ok(config)
}

/// The closest of `candidates` to `name`, if close enough to be a plausible typo.
fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Key paths whose values are secrets: their deserialization errors must not echo the value.
const SECRET_KEYS: [&str; 2] = ["downstream.password", "admission.group_key"];

fn deserialize(
    merged: toml::Table,
    origins: &Origins,
    main_origin: &Origin,
) -> Result<Config, ConfigError> {
    // Kept to read back an offending value for the hint; a config is a few kilobytes.
    let values = merged.clone();
    let err = match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(merged)) {
        Ok(config) => return Ok(config),
        Err(err) => err,
    };
    // For an unknown key, serde_path_to_error ends the path with that key.
    let segments: Vec<String> = err
        .path()
        .iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            serde_path_to_error::Segment::Seq { index } => Some(format!("[{index}]")),
            _ => None,
        })
        .collect();
    let raw = err.inner().message();
    let message = if let Some((section, name, fields)) = unknown_key(&segments) {
        format!("unknown key; {}", unknown_key_hint(section, name, fields))
    } else if let Some(best) = misspelt_variant(&segments, &values) {
        format!("{raw}; did you mean `{best}`?")
    } else if SECRET_KEYS.contains(&segments.join(".").as_str()) {
        "expected a string (the value is a secret and is not shown)".to_string()
    } else {
        raw.to_string()
    };
    let origin = origins.lookup(&segments).unwrap_or(main_origin).clone();
    Err(ConfigError::Invalid {
        origin,
        key: join_key(&segments),
        message,
    })
}

/// When `path` is a key its section does not have: (the section, the key, the section's keys).
fn unknown_key(path: &[String]) -> Option<(&[String], &str, &'static [&'static str])> {
    let (name, section) = path.split_last()?;
    match shape(section)? {
        Shape::Section(fields) if !fields.contains(&name.as_str()) => Some((section, name, fields)),
        _ => None,
    }
}

/// When the value at `path` is a string an enum key does not accept, the closest spelling it
/// does accept.
fn misspelt_variant(path: &[String], values: &toml::Table) -> Option<&'static str> {
    let Shape::Value { variants } = shape(path)? else {
        return None;
    };
    let given = value_at(values, path)?.as_str()?;
    if variants.contains(&given) {
        return None;
    }
    closest(given, variants.iter().copied())
}

/// The value at `path` (names, and `[i]` for an array element) in `table`.
fn value_at<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let mut value = table.get(first)?;
    for segment in rest {
        value = match segment.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Some(index) => value.as_array()?.get(index.parse::<usize>().ok()?)?,
            None => value.as_table()?.get(segment)?,
        };
    }
    Some(value)
}

fn join_key(segments: &[String]) -> String {
    let mut key = String::new();
    for segment in segments {
        if !key.is_empty() && !segment.starts_with('[') {
            key.push('.');
        }
        key.push_str(segment);
    }
    key
}

fn unknown_key_hint(section: &[String], name: &str, expected: &[&str]) -> String {
    if let Some(best) = closest(name, expected.iter().copied()) {
        return format!("did you mean `{best}`?");
    }
    // The right key in the wrong section: `sessions` under [cloud] instead of [cloud.aws].
    let elsewhere = known_keys()
        .into_iter()
        .map(|key| {
            let leaf = key.rsplit('.').next().unwrap_or_default();
            (strsim::jaro_winkler(name, leaf), key)
        })
        .filter(|(score, _)| *score > 0.9)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, key)) = elsewhere {
        return format!("did you mean `{key}`?");
    }
    let here = if section.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in [{}]", section.join("."))
    };
    format!("valid keys {here}: {}", expected.join(", "))
}

/// Which source last set each key path (longest recorded prefix wins).
#[derive(Default)]
struct Origins(BTreeMap<Vec<String>, Origin>);

impl Origins {
    fn set(&mut self, path: &[String], origin: Origin) {
        // A value replaced wholesale forgets where its old sub-keys came from.
        self.0
            .retain(|k, _| !(k.len() > path.len() && k.starts_with(path)));
        self.0.insert(path.to_vec(), origin);
    }

    /// The source of `path` or of its closest enclosing key; failing that (a default value
    /// with a bad sub-key set somewhere), the first source that set a key inside `path`.
    fn lookup(&self, path: &[String]) -> Option<&Origin> {
        if path.is_empty() {
            return None;
        }
        (1..=path.len())
            .rev()
            .find_map(|n| self.0.get(&path[..n]))
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(k, _)| k.starts_with(path))
                    .map(|(_, origin)| origin)
            })
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>().map_err(|e| {
        let (line, column) = e
            .span()
            .map(|span| line_column(&text, span.start))
            .unwrap_or((1, 1));
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim_end().to_string(),
        }
    })
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// `DIR/*.toml` sorted by file name; none when `DIR` does not exist. Hidden files (editor
/// swap files) are skipped.
fn drop_in_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::ReadDir {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::ReadDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".toml") && !name.starts_with('.') {
            files.push(entry.path());
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Deep merge: tables merge key by key, anything else in `src` replaces what `dst` had.
fn merge(
    dst: &mut toml::Table,
    src: toml::Table,
    prefix: &mut Vec<String>,
    origin: &Origin,
    origins: &mut Origins,
) {
    for (key, value) in src {
        prefix.push(key.clone());
        match (dst.get_mut(&key), value) {
            (Some(toml::Value::Table(dst_table)), toml::Value::Table(src_table)) => {
                merge(dst_table, src_table, prefix, origin, origins);
            }
            (_, value) => {
                origins.set(prefix, origin.clone());
                dst.insert(key, value);
            }
        }
        prefix.pop();
    }
}

/// `a.b.c=value` -> (["a","b","c"], value parsed as TOML, or as a plain string if it is not).
fn parse_override(arg: &str) -> Result<(Vec<String>, toml::Value), ConfigError> {
    let bad = |message: &str| ConfigError::BadOverride {
        arg: arg.to_string(),
        message: message.to_string(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE, e.g. cloud.aws.sessions=8"))?;
    let key: Vec<String> = key.trim().split('.').map(str::to_string).collect();
    let valid_segment = |s: &String| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if !key.iter().all(valid_segment) {
        return Err(bad(
            "the key must be a dotted path of letters, digits, '_' and '-', e.g. cloud.aws.sessions",
        ));
    }
    let value = raw
        .parse::<toml::Value>()
        .unwrap_or_else(|_| toml::Value::String(raw.to_string()));
    Ok((key, value))
}

fn set_override(
    root: &mut toml::Table,
    key: &[String],
    value: toml::Value,
    arg: &str,
) -> Result<(), ConfigError> {
    let Some((leaf, parents)) = key.split_last() else {
        return Err(ConfigError::BadOverride {
            arg: arg.to_string(),
            message: "empty key".into(),
        });
    };
    let mut table = root;
    for (depth, segment) in parents.iter().enumerate() {
        let entry = table
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::BadOverride {
                    arg: arg.to_string(),
                    message: format!("{} is a value, not a section", key[..=depth].join(".")),
                })
            }
        };
    }
    match (table.get_mut(leaf), value) {
        // `--set provision.parameters={Region="eu"}` adds to the table rather than replace it,
        // the same deep merge the drop-ins get.
        (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => {
            existing.extend(new);
        }
        (_, value) => {
            table.insert(leaf.clone(), value);
        }
    }
    Ok(())
}
