//! Who may do what: access rules mapping repository globs to users, groups and the anonymous client, plus
//! admins. The one place that answers "which actions may this subject take on this repository".

use globset::GlobSet;

use super::scope::{Action, Actions};
use crate::pattern::glob_set;

/// Who a request is from, once its credentials are checked.
#[derive(Debug, Clone)]
pub struct Subject {
    /// The user or robot name (`robot$NAME` for robots); empty for the anonymous client.
    pub name: String,
    pub groups: Vec<String>,
    pub kind: SubjectKind,
}

#[derive(Debug, Clone)]
pub enum SubjectKind {
    Anonymous,
    /// A user of the htpasswd file or the config: the access rules apply.
    User,
    /// A robot token: exactly its own grants apply, never the rules (a CI token stays as narrow as created).
    Robot(Vec<RobotGrant>),
    /// The subject of a token another server issued: what the token grants is all it may do.
    External,
}

/// One `--scope` of a robot token: a repository glob and actions.
#[derive(Debug, Clone)]
pub struct RobotGrant {
    /// The glob as created, for `token list`.
    pub repositories: String,
    matcher: globset::GlobMatcher,
    pub actions: Actions,
}

impl RobotGrant {
    pub fn new(repositories: &str, actions: Actions) -> Result<RobotGrant, String> {
        let matcher = crate::pattern::glob(repositories)?.compile_matcher();
        Ok(RobotGrant { repositories: repositories.to_string(), matcher, actions })
    }

    /// Parses `--scope GLOB:ACTIONS` (`ci/**:pull,push`).
    pub fn parse(s: &str) -> Result<RobotGrant, String> {
        let (repos, actions) = s.rsplit_once(':').ok_or_else(|| format!("scope {s:?}: expected REPOSITORIES:ACTIONS"))?;
        let mut set = Actions::NONE;
        for a in actions.split(',') {
            set = set.union(if a == "*" { Actions::ALL } else { Actions::of(&[a.parse::<Action>()?]) });
        }
        RobotGrant::new(repos, set)
    }

    /// `GLOB:ACTIONS`, as `parse` reads it.
    pub fn render(&self) -> String {
        format!("{}:{}", self.repositories, self.actions.list())
    }
}

impl Subject {
    pub fn anonymous() -> Subject {
        Subject { name: String::new(), groups: Vec::new(), kind: SubjectKind::Anonymous }
    }

    pub fn is_anonymous(&self) -> bool {
        matches!(self.kind, SubjectKind::Anonymous)
    }

    /// The name as logs and audit lines print it.
    pub fn display(&self) -> &str {
        if self.is_anonymous() {
            "anonymous"
        } else {
            &self.name
        }
    }
}

/// An access rule as configured (`[[auth.access]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRule {
    /// Repository globs (`team/**`), matched against the name in the request path.
    pub repositories: Vec<String>,
    /// User names; `*` is every authenticated user.
    pub users: Vec<String>,
    pub groups: Vec<String>,
    /// The rule applies to clients without credentials too.
    pub anonymous: bool,
    pub actions: Vec<Action>,
}

/// The resolved settings of the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// With no rules, every authenticated user may pull, push and delete everywhere (as with distribution's
    /// htpasswd), and the anonymous client nothing.
    pub rules: Vec<AccessRule>,
    /// Users and groups allowed everything, including `/api/` and `/metrics`.
    pub admins: Vec<String>,
    pub admin_groups: Vec<String>,
    /// Pull everywhere without credentials (`--anonymous-pull`).
    pub anonymous_pull: bool,
}

struct CompiledRule {
    repositories: GlobSet,
    rule: AccessRule,
    actions: Actions,
}

impl CompiledRule {
    fn applies_to(&self, s: &Subject) -> bool {
        match &s.kind {
            SubjectKind::Anonymous => self.rule.anonymous,
            SubjectKind::User => {
                self.rule.users.iter().any(|u| u == "*" || *u == s.name)
                    || self.rule.groups.iter().any(|g| s.groups.contains(g))
            }
            SubjectKind::Robot(_) | SubjectKind::External => false,
        }
    }
}

/// The compiled policy.
pub struct Policy {
    rules: Vec<CompiledRule>,
    config: PolicyConfig,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Result<Policy, String> {
        let mut rules = Vec::new();
        for (i, rule) in config.rules.iter().enumerate() {
            if rule.repositories.is_empty() {
                return Err(format!("access rule {}: no repositories", i + 1));
            }
            let repositories = glob_set(&rule.repositories).map_err(|e| format!("access rule {}: {e}", i + 1))?;
            rules.push(CompiledRule { repositories, actions: Actions::of(&rule.actions), rule: rule.clone() });
        }
        Ok(Policy { rules, config })
    }

    pub fn is_admin(&self, s: &Subject) -> bool {
        matches!(s.kind, SubjectKind::User)
            && (self.config.admins.contains(&s.name) || s.groups.iter().any(|g| self.config.admin_groups.contains(g)))
    }

    /// The actions `s` may take on repository `repo`.
    pub fn actions(&self, s: &Subject, repo: &str) -> Actions {
        let mut granted = if self.config.anonymous_pull { Actions::of(&[Action::Pull]) } else { Actions::NONE };
        match &s.kind {
            _ if self.is_admin(s) => return Actions::ALL,
            SubjectKind::Robot(grants) => {
                for g in grants.iter().filter(|g| g.matcher.is_match(repo)) {
                    granted = granted.union(g.actions);
                }
                return granted;
            }
            SubjectKind::External => return granted,
            SubjectKind::User if self.rules.is_empty() => return Actions::ALL,
            SubjectKind::User | SubjectKind::Anonymous => {}
        }
        for r in &self.rules {
            if r.applies_to(s) && r.repositories.is_match(repo) {
                granted = granted.union(r.actions);
            }
        }
        granted
    }

    /// Whether `s` may pull anything at all without a rule naming the repository: decides whether an anonymous
    /// client gets to see `/v2/` (and a filtered catalog).
    pub fn anonymous_may_pull(&self) -> bool {
        self.config.anonymous_pull || self.rules.iter().any(|r| r.rule.anonymous && r.actions.contains(Action::Pull))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> Subject {
        Subject { name: name.into(), groups: groups.iter().map(|g| g.to_string()).collect(), kind: SubjectKind::User }
    }

    fn rule(repos: &[&str], users: &[&str], groups: &[&str], anonymous: bool, actions: &[Action]) -> AccessRule {
        AccessRule {
            repositories: repos.iter().map(|s| s.to_string()).collect(),
            users: users.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            anonymous,
            actions: actions.to_vec(),
        }
    }

    #[test]
    fn without_rules_users_may_do_everything_and_anonymous_nothing() {
        let p = Policy::new(PolicyConfig::default()).unwrap();
        assert_eq!(p.actions(&user("alice", &[]), "any/repo"), Actions::ALL);
        assert_eq!(p.actions(&Subject::anonymous(), "any/repo"), Actions::NONE);
        assert!(!p.is_admin(&user("alice", &[])));
    }

    #[test]
    fn rules_grant_the_union_of_what_matches() {
        use Action::*;
        let p = Policy::new(PolicyConfig {
            rules: vec![
                rule(&["team/**"], &["alice"], &[], false, &[Pull, Push]),
                rule(&["team/**"], &[], &["ops"], false, &[Delete]),
                rule(&["**"], &["*"], &[], false, &[Pull]),
                rule(&["public/*"], &[], &[], true, &[Pull]),
            ],
            admins: vec!["root".into()],
            admin_groups: vec!["wheel".into()],
            anonymous_pull: false,
        })
        .unwrap();
        let alice = user("alice", &["ops"]);
        assert_eq!(p.actions(&alice, "team/a/b"), Actions::ALL);
        assert_eq!(p.actions(&user("bob", &[]), "team/a"), Actions::of(&[Pull]));
        assert_eq!(p.actions(&Subject::anonymous(), "public/x"), Actions::of(&[Pull]));
        // `*` stays within one path component.
        assert_eq!(p.actions(&Subject::anonymous(), "public/x/y"), Actions::NONE);
        assert!(p.anonymous_may_pull());
        assert!(p.is_admin(&user("root", &[])) && p.is_admin(&user("carol", &["wheel"])));
        assert_eq!(p.actions(&user("carol", &["wheel"]), "anything"), Actions::ALL);
    }

    #[test]
    fn robots_get_exactly_their_grants() {
        let p = Policy::new(PolicyConfig::default()).unwrap();
        let robot = Subject {
            name: "robot$ci".into(),
            groups: vec![],
            kind: SubjectKind::Robot(vec![RobotGrant::parse("ci/**:push").unwrap()]),
        };
        assert_eq!(RobotGrant::parse("a/*:pull,delete").unwrap().render(), "a/*:pull,delete");
        assert!(RobotGrant::parse("a/*:fly").is_err() && RobotGrant::parse("nocolon").is_err());
        assert_eq!(p.actions(&robot, "ci/app"), Actions::of(&[Action::Push]));
        assert_eq!(p.actions(&robot, "other"), Actions::NONE);
    }

    #[test]
    fn bad_globs_and_empty_rules_are_refused() {
        let bad = PolicyConfig { rules: vec![rule(&["team/{"], &["a"], &[], false, &[Action::Pull])], ..Default::default() };
        assert!(Policy::new(bad).is_err());
        let empty = PolicyConfig { rules: vec![rule(&[], &["a"], &[], false, &[Action::Pull])], ..Default::default() };
        assert!(Policy::new(empty).is_err());
    }
}
