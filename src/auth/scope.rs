//! What a request needs and what a token grants: the token specification's scopes
//! (`repository:<name>:<action>[,<action>]`, `registry:catalog:*`), parsed from `scope` parameters and carried in
//! a token's `access` claim.

use serde::{Deserialize, Serialize};

/// The actions of the distribution spec's scopes. `*` in a scope means all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Pull, Action::Push, Action::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Action, String> {
        match s {
            "pull" => Ok(Action::Pull),
            "push" => Ok(Action::Push),
            "delete" => Ok(Action::Delete),
            _ => Err(format!("unknown action {s:?} (pull, push or delete)")),
        }
    }
}

/// A set of actions, as a bit set: granting is an intersection, merging rules a union.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);
    pub const ALL: Actions = Actions(0b111);

    pub fn of(actions: &[Action]) -> Actions {
        Actions(actions.iter().fold(0, |bits, a| bits | a.bit()))
    }

    pub fn contains(self, a: Action) -> bool {
        self.0 & a.bit() != 0
    }

    pub fn covers(self, other: Actions) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }

    pub fn intersect(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL.into_iter().filter(move |a| self.contains(*a))
    }

    /// The comma-separated list of a scope (`pull,push`).
    pub fn list(self) -> String {
        self.iter().map(Action::as_str).collect::<Vec<_>>().join(",")
    }

    /// Parses a scope's action list; unknown actions are ignored (a client may ask for what this server does
    /// not know, and gets the rest), `*` is every action.
    fn parse_list(s: &str) -> Actions {
        s.split(',').fold(Actions::NONE, |set, a| match a.trim() {
            "*" => Actions::ALL,
            a => a.parse::<Action>().map_or(set, |a| set.union(Actions::of(&[a]))),
        })
    }
}

/// One scope: a resource and the actions asked or granted on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `repository:<name>:<actions>`. The name is kept as sent; a name that is not a valid repository name
    /// matches no rule and so is granted nothing.
    Repository { name: String, actions: Actions },
    /// `registry:catalog:*`: listing `/v2/_catalog`.
    Catalog,
}

impl Scope {
    /// Parses one scope; `None` for a resource type this server does not serve (ignored, as the spec allows).
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        // The name may itself hold no `:`, but the actions are after the last one.
        let (name, actions) = rest.rsplit_once(':')?;
        match kind {
            "repository" if !name.is_empty() => Some(Scope::Repository { name: name.to_string(), actions: Actions::parse_list(actions) }),
            "registry" if name == "catalog" => Some(Scope::Catalog),
            _ => None,
        }
    }

    /// Every scope in the values of `scope` parameters (each may hold several, separated by spaces, as the
    /// OAuth2 form sends them).
    pub fn parse_all<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Scope> {
        values.into_iter().flat_map(|v| v.split(' ')).filter(|s| !s.is_empty()).filter_map(Scope::parse).collect()
    }

    /// The scope as the specification writes it.
    pub fn render(&self) -> String {
        match self {
            Scope::Repository { name, actions } => format!("repository:{name}:{}", actions.list()),
            Scope::Catalog => "registry:catalog:*".to_string(),
        }
    }
}

/// One entry of a token's `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl AccessEntry {
    pub fn from_scope(scope: &Scope) -> AccessEntry {
        match scope {
            Scope::Repository { name, actions } => AccessEntry {
                kind: "repository".into(),
                name: name.clone(),
                actions: actions.iter().map(|a| a.as_str().to_string()).collect(),
            },
            Scope::Catalog => AccessEntry { kind: "registry".into(), name: "catalog".into(), actions: vec!["*".into()] },
        }
    }

    pub fn is_catalog(&self) -> bool {
        self.kind == "registry" && self.name == "catalog" && self.actions.iter().any(|a| a == "*")
    }
}

/// What an `access` claim grants, parsed once when its token is verified (a request then looks it up without
/// parsing or allocating).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    repos: Vec<(String, Actions)>,
    catalog: bool,
}

impl Grants {
    pub fn of(access: &[AccessEntry]) -> Grants {
        let mut g = Grants::default();
        for e in access {
            if e.is_catalog() {
                g.catalog = true;
            } else if e.kind == "repository" {
                g.repos.push((e.name.clone(), Actions::parse_list(&e.actions.join(","))));
            }
        }
        g
    }

    /// The actions granted on repository `name` (the union of its entries).
    pub fn actions(&self, name: &str) -> Actions {
        self.repos.iter().filter(|(n, _)| n == name).fold(Actions::NONE, |a, (_, x)| a.union(*x))
    }

    pub fn catalog(&self) -> bool {
        self.catalog
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_as_the_spec_writes_them() {
        assert_eq!(
            Scope::parse("repository:samalba/my-app:pull,push"),
            Some(Scope::Repository { name: "samalba/my-app".into(), actions: Actions::of(&[Action::Pull, Action::Push]) })
        );
        assert_eq!(Scope::parse("repository:a:*"), Some(Scope::Repository { name: "a".into(), actions: Actions::ALL }));
        assert_eq!(Scope::parse("registry:catalog:*"), Some(Scope::Catalog));
        // Unknown actions are dropped, unknown resource types ignored.
        assert_eq!(Scope::parse("repository:a:pull,frobnicate"), Some(Scope::Repository { name: "a".into(), actions: Actions::of(&[Action::Pull]) }));
        assert_eq!(Scope::parse("repository(plugin):a:pull"), None);
        assert_eq!(Scope::parse("repository::pull"), None);
        assert_eq!(Scope::parse("nonsense"), None);
        let all = Scope::parse_all(["repository:a:pull repository:b:push", "registry:catalog:*"]);
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].render(), "repository:b:push");
    }

    #[test]
    fn access_entries_grant_only_their_repository_once_parsed() {
        let e = AccessEntry::from_scope(&Scope::parse("repository:a/b:pull,delete").unwrap());
        let g = Grants::of(std::slice::from_ref(&e));
        assert_eq!(g.actions("a/b"), Actions::of(&[Action::Pull, Action::Delete]));
        assert_eq!(g.actions("a/bc"), Actions::NONE);
        assert!(!e.is_catalog());
        assert!(AccessEntry::from_scope(&Scope::Catalog).is_catalog());
        let g = Grants::of(&[e.clone(), AccessEntry::from_scope(&Scope::parse("repository:a/b:push").unwrap()), AccessEntry::from_scope(&Scope::Catalog)]);
        assert_eq!(g.actions("a/b"), Actions::ALL);
        assert_eq!(g.actions("a"), Actions::NONE);
        assert!(g.catalog() && !Grants::of(&[e]).catalog());
    }
}
