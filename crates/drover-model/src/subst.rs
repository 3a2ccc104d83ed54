//! `{placeholder}` substitution in commands, args, env values and artifact URLs.
//!
//! Known placeholders: `{version}` (at plan time), and, on the instance, `{addr}` (its address),
//! `{instance}` (its id), `{dir}` (its directory), `{drover}` (the drover binary) and
//! `{port.NAME}` (a named port). `{{` and `}}` stand for literal braces.

/// A placeholder that is malformed or unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubstError {
    #[error("unclosed '{{' in {0:?}; write '{{{{' for a literal brace")]
    Unclosed(String),
    #[error("unknown placeholder {{{name}}}; allowed: {{version}}, {{addr}}, {{instance}}, {{dir}}, {{drover}}, {{port.NAME}} with NAME one of: {ports}")]
    Unknown { name: String, ports: String },
}

enum Piece<'a> {
    Lit(&'a str),
    Var(&'a str),
}

fn pieces(text: &str) -> Result<Vec<Piece<'_>>, SubstError> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            out.push(Piece::Lit("{"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            out.push(Piece::Lit("}"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| SubstError::Unclosed(text.to_string()))?;
            out.push(Piece::Var(&r[..end]));
            rest = &r[end + 1..];
        } else {
            let end = rest.find(['{', '}']).unwrap_or(rest.len()).max(1);
            out.push(Piece::Lit(&rest[..end]));
            rest = &rest[end..];
        }
    }
    Ok(out)
}

/// Check that every placeholder in `text` is one the agent will know.
pub fn check_placeholders(text: &str, ports: &[&str]) -> Result<(), SubstError> {
    for piece in pieces(text)? {
        if let Piece::Var(name) = piece {
            let known = matches!(name, "version" | "addr" | "instance" | "dir" | "drover")
                || name
                    .strip_prefix("port.")
                    .is_some_and(|p| ports.contains(&p));
            if !known {
                return Err(SubstError::Unknown {
                    name: name.to_string(),
                    ports: if ports.is_empty() {
                        "none".to_string()
                    } else {
                        ports.join(", ")
                    },
                });
            }
        }
    }
    Ok(())
}

/// Replace the placeholders `lookup` knows; keep the others (re-escaped) for a later pass.
pub fn render_partial(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let Ok(parts) = pieces(text) else {
        return text.to_string();
    };
    let mut out = String::with_capacity(text.len());
    for piece in parts {
        match piece {
            Piece::Lit(l) => out.push_str(&l.replace('{', "{{").replace('}', "}}")),
            Piece::Var(v) => match lookup(v) {
                Some(val) => out.push_str(&val.replace('{', "{{").replace('}', "}}")),
                None => {
                    out.push('{');
                    out.push_str(v);
                    out.push('}');
                }
            },
        }
    }
    out
}

/// Replace every placeholder; an unknown one is an error.
pub fn render(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, SubstError> {
    let mut out = String::with_capacity(text.len());
    for piece in pieces(text)? {
        match piece {
            Piece::Lit(l) => out.push_str(l),
            Piece::Var(v) => match lookup(v) {
                Some(val) => out.push_str(&val),
                None => {
                    return Err(SubstError::Unknown {
                        name: v.to_string(),
                        ports: String::new(),
                    })
                }
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "version" => Some("v2".into()),
            "addr" => Some("127.1.0.3".into()),
            "port.http" => Some("8080".into()),
            _ => None,
        }
    }

    #[test]
    fn renders_all_and_escapes() {
        assert_eq!(
            render("{addr}:{port.http} {{x}} {version}", vars).unwrap(),
            "127.1.0.3:8080 {x} v2"
        );
        assert!(render("{nope}", vars).is_err());
        assert!(render("{addr", vars).is_err());
    }

    #[test]
    fn partial_keeps_unknown_and_round_trips() {
        let only_version = |n: &str| (n == "version").then(|| "v9".to_string());
        let once = render_partial("app-{version}/{addr} {{lit}}", only_version);
        assert_eq!(once, "app-v9/{addr} {{lit}}");
        assert_eq!(render(&once, vars).unwrap(), "app-v9/127.1.0.3 {lit}");
    }

    #[test]
    fn checks_names() {
        assert!(check_placeholders("{port.http}", &["http"]).is_ok());
        let e = check_placeholders("{port.admin}", &["http"]).unwrap_err();
        assert!(e.to_string().contains("http"), "{e}");
        assert!(check_placeholders("{versoin}", &[]).is_err());
    }
}
