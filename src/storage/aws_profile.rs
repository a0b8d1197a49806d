//! The AWS shared files (`~/.aws/credentials`, `~/.aws/config`): a profile's static keys, region, endpoint and CA
//! bundle, as every AWS tool reads them. `object_store` reads the environment and instance metadata but not these
//! files, and the one crate that does (`aws-config`) brings the whole AWS SDK; the format is a few lines of INI.
//!
//! Where the files are and which profile: `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`),
//! `AWS_CONFIG_FILE` (default `~/.aws/config`), `AWS_PROFILE` (default `default`). A setting in the credentials
//! file wins over the same one in the config file, as in the AWS CLI. A missing file is no profile; a profile named
//! by `AWS_PROFILE` that neither file has is an error (the user asked for it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What breakwater takes from a profile; everything else in it is ignored, except the credential sources it
/// cannot use, which are refused (see `load`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Profile {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// A PEM file of CAs to trust for the endpoint.
    pub ca_bundle: Option<PathBuf>,
}

/// Settings by which a profile gets credentials from elsewhere (roles, SSO, a helper program): breakwater does not
/// implement them, and quietly using other credentials instead would surprise.
const UNSUPPORTED: &[&str] = &["role_arn", "source_profile", "credential_process", "sso_session", "sso_start_url", "web_identity_token_file"];

/// Reads the profile the environment selects (`env` looks a variable up). `Ok(None)`: no file has it.
pub fn load(env: impl Fn(&str) -> Option<String>) -> Result<Option<Profile>, String> {
    let home = env("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| env(var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(default)));
    let named = env("AWS_PROFILE").filter(|p| !p.is_empty());
    let name = named.clone().unwrap_or_else(|| "default".to_string());
    let credentials = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials").map(read).transpose()?.flatten();
    let config = file("AWS_CONFIG_FILE", ".aws/config").map(read).transpose()?.flatten();
    let mut settings = HashMap::new();
    let config_section = if name == "default" { "default".to_string() } else { format!("profile {name}") };
    let mut found = false;
    // The config file first, so that the credentials file's settings replace its.
    for (text, section) in [(config.as_deref(), config_section.as_str()), (credentials.as_deref(), name.as_str())] {
        if let Some(values) = text.and_then(|t| section_of(t, section)) {
            found = true;
            settings.extend(values);
        }
    }
    if !found {
        return match named {
            Some(p) => Err(format!("AWS_PROFILE={p}: no such profile in the AWS credentials or config file")),
            None => Ok(None),
        };
    }
    let take = |k: &str| settings.get(k).cloned().filter(|v| !v.is_empty());
    if take("aws_access_key_id").is_none() {
        if let Some(k) = UNSUPPORTED.iter().find(|k| take(k).is_some()) {
            return Err(format!(
                "AWS profile {name} gets its credentials through {k}, which breakwater does not support: \
                 give it aws_access_key_id and aws_secret_access_key, or use the AWS_* variables or instance metadata"
            ));
        }
    }
    Ok(Some(Profile {
        access_key_id: take("aws_access_key_id"),
        secret_access_key: take("aws_secret_access_key"),
        session_token: take("aws_session_token"),
        region: take("region"),
        endpoint_url: take("endpoint_url"),
        ca_bundle: take("ca_bundle").map(PathBuf::from),
    }))
}

/// A file's text; `None` if it does not exist.
fn read(path: PathBuf) -> Result<Option<String>, String> {
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", display(&path))),
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// The `key = value` settings of section `[name]` (keys in lower case); `None` if the text has no such section.
/// Indented lines continue the setting above them (AWS's nested service settings); they are skipped.
fn section_of(text: &str, name: &str) -> Option<HashMap<String, String>> {
    let mut values = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(header) = trimmed.strip_prefix('[') {
            let header = header.split(']').next().unwrap_or("");
            let this = header.split_whitespace().collect::<Vec<_>>().join(" ");
            if this == name {
                values.get_or_insert_with(HashMap::new);
            } else if values.is_some() {
                // The section ended; a later section of the same name would be odd, and is ignored.
                break;
            }
            continue;
        }
        let (Some(map), false) = (values.as_mut(), line.starts_with([' ', '\t'])) else { continue };
        if let Some((k, v)) = trimmed.split_once('=') {
            map.insert(k.trim().to_ascii_lowercase(), strip_comment(v.trim()).to_string());
        }
    }
    values
}

/// A value without a trailing ` # comment` (a `#` right after a character belongs to the value).
fn strip_comment(v: &str) -> &str {
    let cut = [" #", "\t#", " ;", "\t;"].iter().filter_map(|m| v.find(m)).min();
    cut.map_or(v, |i| v[..i].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        move |k| vars.get(k).cloned()
    }

    fn home(credentials: &str, config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(dir.path().join(".aws/credentials"), credentials).unwrap();
        std::fs::write(dir.path().join(".aws/config"), config).unwrap();
        dir
    }

    #[test]
    fn the_default_profile_from_both_files_credentials_winning() {
        let dir = home(
            "# keys\n[default]\naws_access_key_id = AKID\naws_secret_access_key=SECRET # a comment\n[other]\naws_access_key_id = NOT\n",
            "[default]\nregion = eu-west-3\nendpoint_url = https://s3.internal:9000\ns3 =\n  addressing_style = path\naws_access_key_id = FROMCONFIG\nca_bundle = /etc/ca.pem\n",
        );
        let p = load(env_of(&[("HOME", dir.path().display().to_string())])).unwrap().unwrap();
        assert_eq!(p.access_key_id.as_deref(), Some("AKID"));
        assert_eq!(p.secret_access_key.as_deref(), Some("SECRET"));
        assert_eq!(p.region.as_deref(), Some("eu-west-3"));
        assert_eq!(p.endpoint_url.as_deref(), Some("https://s3.internal:9000"));
        assert_eq!(p.ca_bundle.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(p.session_token, None);
    }

    #[test]
    fn a_named_profile_uses_profile_sections_in_the_config_file() {
        let dir = home("[ci]\naws_access_key_id = CI\naws_secret_access_key = S\n", "[profile ci]\nregion = us-west-2\n[ci]\nregion = wrong\n");
        let env = env_of(&[("HOME", dir.path().display().to_string()), ("AWS_PROFILE", "ci".into())]);
        let p = load(env).unwrap().unwrap();
        assert_eq!((p.access_key_id.as_deref(), p.region.as_deref()), (Some("CI"), Some("us-west-2")));
    }

    #[test]
    fn files_named_by_the_environment_replace_the_home_ones() {
        let dir = home("[default]\naws_access_key_id = HOME\n", "");
        let other = dir.path().join("creds");
        std::fs::write(&other, "[default]\naws_access_key_id = ELSEWHERE\n").unwrap();
        let env = env_of(&[("HOME", dir.path().display().to_string()), ("AWS_SHARED_CREDENTIALS_FILE", other.display().to_string())]);
        assert_eq!(load(env).unwrap().unwrap().access_key_id.as_deref(), Some("ELSEWHERE"));
    }

    #[test]
    fn no_files_is_no_profile_but_a_missing_named_profile_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(env_of(&[("HOME", dir.path().display().to_string())])).unwrap(), None);
        assert_eq!(load(env_of(&[])).unwrap(), None);
        let err = load(env_of(&[("HOME", dir.path().display().to_string()), ("AWS_PROFILE", "prod".into())])).unwrap_err();
        assert!(err.contains("AWS_PROFILE=prod"), "{err}");
    }

    #[test]
    fn credential_sources_breakwater_cannot_use_are_refused() {
        let dir = home("", "[default]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = base\n");
        let err = load(env_of(&[("HOME", dir.path().display().to_string())])).unwrap_err();
        assert!(err.contains("role_arn") && err.contains("does not support"), "{err}");
        // With static keys beside it, the keys are used.
        let dir = home("[default]\naws_access_key_id = K\naws_secret_access_key = S\n", "[default]\nrole_arn = arn\n");
        assert!(load(env_of(&[("HOME", dir.path().display().to_string())])).unwrap().is_some());
    }

    #[test]
    fn comments_need_whitespace_before_them() {
        assert_eq!(strip_comment("abc#def"), "abc#def");
        assert_eq!(strip_comment("abc # def"), "abc");
        assert_eq!(strip_comment("abc\t; def"), "abc");
    }
}
