//! Environment options with docker's rules: `-e NAME=VALUE` sets, `-e NAME`
//! copies the caller's value (or sets nothing when the caller has none), and
//! an `--env-file` holds one such item per line, with blank lines and lines
//! starting with `#` skipped and no quoting (the value is the rest of the line).

/// Why an environment option was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("invalid environment variable `{0}`: the name cannot be empty or contain whitespace")]
    BadName(String),
    #[error("{file}, line {line}: {reason}")]
    InFile { file: String, line: usize, reason: Box<EnvError> },
}

/// One `-e` item; `caller` looks up the caller's environment.
pub fn parse_item(
    item: &str,
    caller: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(String, String)>, EnvError> {
    let (name, value) = match item.split_once('=') {
        Some((name, value)) => (name, Some(value.to_string())),
        None => (item, None),
    };
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err(EnvError::BadName(item.to_string()));
    }
    Ok(value.or_else(|| caller(name)).map(|value| (name.to_string(), value)))
}

/// The items of an env file's `contents`; `file` names it in errors.
pub fn parse_file(
    file: &str,
    contents: &str,
    caller: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, EnvError> {
    let mut out = Vec::new();
    for (i, line) in contents.lines().enumerate() {
        let item = line.trim_start();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        let parsed = parse_item(item, caller).map_err(|e| EnvError::InFile {
            file: file.to_string(),
            line: i + 1,
            reason: Box::new(e),
        })?;
        out.extend(parsed);
    }
    Ok(out)
}

/// Sets `name` in `env`, replacing an earlier value in place.
pub fn set(env: &mut Vec<(String, String)>, name: &str, value: String) {
    match env.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = value,
        None => env.push((name.to_string(), value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str) -> Option<String> {
        (name == "HOSTVAR").then(|| "from host".to_string())
    }

    #[test]
    fn items_set_copy_or_skip() {
        assert_eq!(parse_item("A=1=2", &caller), Ok(Some(("A".into(), "1=2".into()))));
        assert_eq!(parse_item("A=", &caller), Ok(Some(("A".into(), String::new()))));
        assert_eq!(
            parse_item("HOSTVAR", &caller),
            Ok(Some(("HOSTVAR".into(), "from host".into())))
        );
        assert_eq!(parse_item("UNSET", &caller), Ok(None));
        assert_eq!(parse_item("=x", &caller), Err(EnvError::BadName("=x".into())));
        assert_eq!(parse_item("A B=x", &caller), Err(EnvError::BadName("A B=x".into())));
    }

    #[test]
    fn env_files_skip_comments_and_blank_lines_and_name_bad_lines() {
        let text = "# comment\n\nA=1\n  B=\"quoted\"\nHOSTVAR\nUNSET\n";
        assert_eq!(
            parse_file("f.env", text, &caller),
            Ok(vec![
                ("A".into(), "1".into()),
                ("B".into(), "\"quoted\"".into()),
                ("HOSTVAR".into(), "from host".into()),
            ])
        );
        let err = parse_file("f.env", "A=1\n=bad\n", &caller).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.env, line 2: invalid environment variable `=bad`: the name cannot be empty or contain whitespace"
        );
    }

    #[test]
    fn set_replaces_in_place() {
        let mut env = vec![("A".to_string(), "1".to_string()), ("B".to_string(), "2".to_string())];
        set(&mut env, "A", "3".into());
        set(&mut env, "C", "4".into());
        assert_eq!(
            env,
            [("A".into(), "3".into()), ("B".into(), "2".into()), ("C".into(), "4".into())]
        );
    }
}
