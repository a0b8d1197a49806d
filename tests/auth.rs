//! Access control, driven over real sockets: real clients (skopeo, podman, containerd) through the token flow
//! and basic mode, and the spec's answers (401 with a challenge, 403 `DENIED`) checked request by request.
//! Users come from a real `htpasswd -B` file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use common::auth::{basic, htpasswd};
use common::images::{self, Podman};
use common::oci::{pseudo_random, sha256, OCI_MANIFEST};
use common::Breakwater;
use serde_json::Value;

const ALICE: (&str, &str) = ("alice", "alice-pw-7f3a");
const BOB: (&str, &str) = ("bob", "bob-pw-91c2");
const ROOT: (&str, &str) = ("root", "root-pw-5d0e");

/// The policy most tests use: alice pushes to `team/**`, `other/**` and `public/**`, bob only pulls `team/**`,
/// root is the admin, anyone may pull `public/**`.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let file = htpasswd(dir, &[ALICE, BOB, ROOT]);
    let text = format!(
        r#"
[auth]
htpasswd = "{}"
admins = ["root"]
{extra}

[[auth.access]]
repositories = ["team/**", "other/**", "public/**"]
users = ["alice"]
actions = ["pull", "push", "delete"]

[[auth.access]]
repositories = ["team/**"]
users = ["bob"]
actions = ["pull"]

[[auth.access]]
repositories = ["public/**"]
anonymous = true
users = ["*"]
actions = ["pull"]
"#,
        file.display()
    );
    let path = dir.join("breakwater.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// One request; returns status, headers and body.
async fn req(method: &str, url: &str, auth: Option<&str>, body: Option<(&str, Vec<u8>)>) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut r = reqwest::Client::new().request(method.parse().unwrap(), url);
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    if let Some((ct, bytes)) = body {
        r = r.header("content-type", ct).body(bytes);
    }
    let resp = r.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

fn error_code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    v["errors"][0]["code"].as_str().unwrap_or_default().to_string()
}

fn challenge(headers: &reqwest::header::HeaderMap) -> String {
    headers.get("www-authenticate").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

/// A token from `/auth/token` (GET form) for `scopes`, with `creds` or anonymously; (status, JSON).
async fn token(bw: &Breakwater, creds: Option<(&str, &str)>, scopes: &[&str]) -> (u16, Value) {
    let mut url = bw.url("/auth/token?service=breakwater");
    for s in scopes {
        url.push_str(&format!("&scope={s}"));
    }
    let auth = creds.map(|(u, p)| basic(u, p));
    let (status, _, body) = req("GET", &url, auth.as_deref(), None).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn bearer(t: &Value) -> String {
    format!("Bearer {}", t["token"].as_str().expect("a token"))
}

/// The `access` claim of a JWT (read without verifying: the server verifies, the test looks).
fn access_of(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap();
    serde_json::from_slice::<Value>(&bytes).unwrap()["access"].clone()
}

/// Pushes a one-layer image to `repo:tag` with `auth` on every request; returns the manifest digest.
async fn push(bw: &Breakwater, repo: &str, tag: &str, auth: &str, seed: u64) -> String {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    let layer = pseudo_random(5000, seed);
    for blob in [&config, &layer] {
        let url = bw.url(&format!("/v2/{repo}/blobs/uploads/?digest={}", sha256(blob)));
        let (status, _, body) = req("POST", &url, Some(auth), Some(("application/octet-stream", blob.clone()))).await;
        assert_eq!(status, 201, "blob push to {repo}: {}", String::from_utf8_lossy(&body));
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        sha256(&config), config.len(), sha256(&layer), layer.len()
    );
    let url = bw.url(&format!("/v2/{repo}/manifests/{tag}"));
    let (status, _, body) = req("PUT", &url, Some(auth), Some((OCI_MANIFEST, manifest.clone().into_bytes()))).await;
    assert_eq!(status, 201, "manifest push to {repo}: {}", String::from_utf8_lossy(&body));
    sha256(manifest.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_answers_401_with_a_challenge_and_403_when_not_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let bw = Breakwater::start_with(&["--config", config(dir.path(), "").to_str().unwrap()]);
    let alice = basic(ALICE.0, ALICE.1);

    // No credentials: 401 UNAUTHORIZED, with the realm on the address the client used and the scope it needs.
    let (status, headers, body) = req("GET", &bw.url("/v2/"), None, None).await;
    assert_eq!((status, error_code(&body).as_str()), (401, "UNAUTHORIZED"));
    assert_eq!(challenge(&headers), format!("Bearer realm=\"http://{}/auth/token\",service=\"breakwater\"", bw.addr));
    assert_eq!(headers["docker-distribution-api-version"], "registry/2.0", "Docker reads it from the 401");
    let (status, headers, _) = req("GET", &bw.url("/v2/team/app/manifests/v1"), None, None).await;
    assert_eq!(status, 401);
    assert!(challenge(&headers).ends_with(",scope=\"repository:team/app:pull\""), "{}", challenge(&headers));
    let (status, headers, _) = req("POST", &bw.url("/v2/team/app/blobs/uploads/"), None, None).await;
    assert_eq!(status, 401, "anonymous push refused");
    assert!(challenge(&headers).contains("scope=\"repository:team/app:pull,push\""), "{}", challenge(&headers));

    // Wrong password: 401 at the token endpoint and on the API.
    assert_eq!(token(&bw, Some((ALICE.0, "wrong")), &["repository:team/app:pull"]).await.0, 401);
    assert_eq!(req("GET", &bw.url("/v2/"), Some(&basic(ALICE.0, "wrong")), None).await.0, 401);

    let digest = push(&bw, "team/app", "v1", &alice, 1).await;
    push(&bw, "other/lib", "v1", &alice, 2).await;

    // bob asks for pull and push on team/app and is granted pull only: a partial grant, not an error.
    let (status, t) = token(&bw, Some(BOB), &["repository:team/app:pull,push"]).await;
    assert_eq!(status, 200);
    assert_eq!(access_of(t["token"].as_str().unwrap()), serde_json::json!([{"type":"repository","name":"team/app","actions":["pull"]}]));
    assert_eq!(t["expires_in"], 300);
    let (status, headers, _) = req("GET", &bw.url("/v2/team/app/manifests/v1"), Some(&bearer(&t)), None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["docker-content-digest"], digest.as_str());
    // Authenticated but not allowed: 403 DENIED.
    let (status, _, body) = req("POST", &bw.url("/v2/team/app/blobs/uploads/"), Some(&bearer(&t)), None).await;
    assert_eq!((status, error_code(&body).as_str()), (403, "DENIED"));
    let (status, _, body) = req("GET", &bw.url("/v2/other/lib/manifests/v1"), Some(&basic(BOB.0, BOB.1)), None).await;
    assert_eq!((status, error_code(&body).as_str()), (403, "DENIED"));

    // alice's pull-only token lacks a scope she would be granted: 401 insufficient_scope, so she fetches another.
    let (_, t) = token(&bw, Some(ALICE), &["repository:team/app:pull"]).await;
    let (status, headers, _) = req("DELETE", &bw.url(&format!("/v2/team/app/manifests/{digest}")), Some(&bearer(&t)), None).await;
    assert_eq!(status, 401);
    assert!(challenge(&headers).contains("error=\"insufficient_scope\""), "{}", challenge(&headers));
    // A token for one repository grants nothing on another.
    assert_eq!(req("GET", &bw.url("/v2/other/lib/manifests/v1"), Some(&bearer(&t)), None).await.0, 401);

    // The catalog shows each caller what they may pull.
    let (_, t) = token(&bw, Some(BOB), &["registry:catalog:*"]).await;
    let (status, _, body) = req("GET", &bw.url("/v2/_catalog"), Some(&bearer(&t)), None).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["repositories"], serde_json::json!(["team/app"]));
    let (_, _, body) = req("GET", &bw.url("/v2/_catalog"), Some(&alice), None).await;
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["repositories"], serde_json::json!(["other/lib", "team/app"]));

    // The API and metrics are the admin's.
    let (status, headers, _) = req("GET", &bw.url("/api/replication"), None, None).await;
    assert_eq!(status, 401);
    assert!(challenge(&headers).starts_with("Basic "), "{}", challenge(&headers));
    assert_eq!(req("GET", &bw.url("/api/replication"), Some(&alice), None).await.0, 403);
    assert_eq!(req("GET", &bw.url("/api/replication"), Some(&basic(ROOT.0, ROOT.1)), None).await.0, 200);
    assert_eq!(req("GET", &bw.url("/metrics"), Some(&alice), None).await.0, 403);
    assert_eq!(req("GET", &bw.url("/metrics"), Some(&basic(ROOT.0, ROOT.1)), None).await.0, 200);
    let (_, t) = token(&bw, Some(ROOT), &[]).await;
    assert_eq!(req("GET", &bw.url("/api/replication"), Some(&bearer(&t)), None).await.0, 200);
    // Health checks stay open.
    assert_eq!(req("GET", &bw.url("/healthz"), None, None).await.0, 200);
}

/// A cross-repository mount needs pull on its source (`from`) as well as push on its target, as distribution
/// asks: the 401 challenge names both scopes, and a token lacking the source's pull gets `insufficient_scope`
/// when the user would be granted it (so the client fetches one that lets the mount happen, as the OCI
/// conformance suite does with a token it cached for the target), or else quietly falls back to an upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_asks_for_pull_on_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "[[auth.access]]\nrepositories = [\"secret/**\"]\nusers = [\"root\"]\nactions = [\"pull\", \"push\"]\n";
    let bw = Breakwater::start_with(&["--config", config(dir.path(), secret).to_str().unwrap()]);
    let blob = pseudo_random(3000, 41);
    let digest = sha256(&blob);
    for (repo, who) in [("team/src", ALICE), ("secret/src", ROOT)] {
        let url = bw.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}"));
        let (status, _, body) = req("POST", &url, Some(&basic(who.0, who.1)), Some(("application/octet-stream", blob.clone()))).await;
        assert_eq!(status, 201, "blob push to {repo}: {}", String::from_utf8_lossy(&body));
    }
    let mount = |from: &str| bw.url(&format!("/v2/team/dst/blobs/uploads/?mount={digest}&from={from}"));

    // No credentials: the challenge asks for push on the target and pull on the source, in one scope value.
    let (status, headers, _) = req("POST", &mount("team/src"), None, None).await;
    assert_eq!(status, 401);
    assert!(
        challenge(&headers).contains("scope=\"repository:team/dst:pull,push repository:team/src:pull\""),
        "{}",
        challenge(&headers)
    );

    // A token for the target alone: alice may pull the source, so it is worth another token.
    let (_, t) = token(&bw, Some(ALICE), &["repository:team/dst:pull,push"]).await;
    let (status, headers, body) = req("POST", &mount("team/src"), Some(&bearer(&t)), None).await;
    assert_eq!((status, error_code(&body).as_str()), (401, "UNAUTHORIZED"));
    let c = challenge(&headers);
    assert!(c.contains("error=\"insufficient_scope\"") && c.contains("repository:team/src:pull"), "{c}");
    // The token the challenge asks for (one scope parameter holding both) mounts.
    let (_, t) = token(&bw, Some(ALICE), &["repository:team/dst:pull,push%20repository:team/src:pull"]).await;
    let (status, headers, _) = req("POST", &mount("team/src"), Some(&bearer(&t)), None).await;
    assert_eq!(status, 201, "mounted");
    assert_eq!(headers["location"], format!("/v2/team/dst/blobs/{digest}").as_str());
    assert_eq!(headers["docker-content-digest"], digest.as_str());

    // A source alice may not pull: no 401 loop and no bytes, the mount falls back to an upload.
    let (_, t) = token(&bw, Some(ALICE), &["repository:team/dst2:pull,push"]).await;
    let url = bw.url(&format!("/v2/team/dst2/blobs/uploads/?mount={digest}&from=secret/src"));
    let (status, headers, _) = req("POST", &url, Some(&bearer(&t)), None).await;
    assert_eq!(status, 202, "fell back to an upload");
    assert!(headers["location"].to_str().unwrap().starts_with("/v2/team/dst2/blobs/uploads/"));
    let (status, _, _) = req("HEAD", &bw.url(&format!("/v2/team/dst2/blobs/{digest}")), Some(&bearer(&t)), None).await;
    assert_eq!(status, 404, "nothing was mounted from a repository alice may not read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_pull_only_where_the_policy_says() {
    let dir = tempfile::tempdir().unwrap();
    let bw = Breakwater::start_with(&["--config", config(dir.path(), "").to_str().unwrap()]);
    let alice = basic(ALICE.0, ALICE.1);
    let digest = push(&bw, "public/tool", "v1", &alice, 3).await;
    push(&bw, "team/app", "v1", &alice, 4).await;

    let (status, t) = token(&bw, None, &["repository:public/tool:pull,push", "repository:team/app:pull"]).await;
    assert_eq!(status, 200, "an anonymous token is not an error");
    assert_eq!(access_of(t["token"].as_str().unwrap()), serde_json::json!([{"type":"repository","name":"public/tool","actions":["pull"]}]));
    assert!(t.get("refresh_token").is_none());
    let (status, headers, _) = req("GET", &bw.url("/v2/public/tool/manifests/v1"), Some(&bearer(&t)), None).await;
    assert_eq!((status, headers["docker-content-digest"].to_str().unwrap()), (200, digest.as_str()));
    // Anonymous and not allowed: 401 (credentials might help), never 403.
    assert_eq!(req("GET", &bw.url("/v2/team/app/manifests/v1"), Some(&bearer(&t)), None).await.0, 401);
    assert_eq!(req("POST", &bw.url("/v2/public/tool/blobs/uploads/"), Some(&bearer(&t)), None).await.0, 401);
    let (_, t) = token(&bw, None, &["registry:catalog:*"]).await;
    let (_, _, body) = req("GET", &bw.url("/v2/_catalog"), Some(&bearer(&t)), None).await;
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["repositories"], serde_json::json!(["public/tool"]));

    // --anonymous-pull opens every repository to pulls, and nothing else.
    let data = bw.stop();
    let htpasswd = dir.path().join("htpasswd");
    let bw = Breakwater::start_in(data, &["--htpasswd", htpasswd.to_str().unwrap(), "--anonymous-pull"]);
    let (_, t) = token(&bw, None, &["repository:team/app:pull,push"]).await;
    assert_eq!(access_of(t["token"].as_str().unwrap()), serde_json::json!([{"type":"repository","name":"team/app","actions":["pull"]}]));
    assert_eq!(req("GET", &bw.url("/v2/team/app/manifests/v1"), Some(&bearer(&t)), None).await.0, 200);
    assert_eq!(req("POST", &bw.url("/v2/team/app/blobs/uploads/"), Some(&bearer(&t)), None).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_foreign_tokens_are_refused() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let dir = tempfile::tempdir().unwrap();
    let bw = Breakwater::start_with(&["--config", config(dir.path(), "").to_str().unwrap()]);
    let alice = basic(ALICE.0, ALICE.1);
    push(&bw, "team/app", "v1", &alice, 5).await;
    let (_, t) = token(&bw, Some(ALICE), &["repository:team/app:pull"]).await;
    assert_eq!(req("GET", &bw.url("/v2/team/app/manifests/v1"), Some(&bearer(&t)), None).await.0, 200);

    // Tokens signed with the server's own key but expired, or for another service, and tokens signed by another key.
    let own = std::fs::read(bw.data.path().join("auth/token-signing-key.pem")).unwrap();
    let own = EncodingKey::from_ed_pem(&own).unwrap();
    let other_key = {
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        EncodingKey::from_ed_der(pkcs8.as_ref())
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = |aud: &str, exp: u64| {
        serde_json::json!({"iss":"breakwater","sub":"alice","aud":aud,"exp":exp,"nbf":now - 600,"iat":now - 600,"jti":"t",
            "access":[{"type":"repository","name":"team/app","actions":["pull","push","delete"]}]})
    };
    let sign = |key: &EncodingKey, c: Value| encode(&Header::new(Algorithm::EdDSA), &c, key).unwrap();
    let good = sign(&own, claims("breakwater", now + 300));
    assert_eq!(req("GET", &bw.url("/v2/team/app/manifests/v1"), Some(&format!("Bearer {good}")), None).await.0, 200, "the test signs as the server does");
    for (what, forged) in [
        ("expired", sign(&own, claims("breakwater", now - 60))),
        ("another service", sign(&own, claims("elsewhere", now + 300))),
        ("another key", sign(&other_key, claims("breakwater", now + 300))),
        ("not a JWT", "abc.def.ghi".to_string()),
    ] {
        let (status, headers, body) = req("GET", &bw.url("/v2/team/app/manifests/v1"), Some(&format!("Bearer {forged}")), None).await;
        assert_eq!((status, error_code(&body).as_str()), (401, "UNAUTHORIZED"), "{what}");
        assert!(challenge(&headers).contains("error=\"invalid_token\""), "{what}: {}", challenge(&headers));
    }
    // A refresh token is not an access token.
    let form = format!("grant_type=password&service=breakwater&client_id=test&access_type=offline&username={}&password={}&scope=repository:team/app:pull", ALICE.0, ALICE.1);
    let (status, _, body) = req("POST", &bw.url("/auth/token"), None, Some(("application/x-www-form-urlencoded", form.into_bytes()))).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let refresh = answer["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(req("GET", &bw.url("/v2/team/app/manifests/v1"), Some(&format!("Bearer {refresh}")), None).await.0, 401);
    assert_eq!(req("GET", &bw.url("/v2/team/app/manifests/v1"), Some(&format!("Bearer {}", answer["access_token"].as_str().unwrap())), None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oauth2_form_issues_and_refreshes_until_the_user_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let bw = Breakwater::start_with(&["--config", cfg.to_str().unwrap()]);
    push(&bw, "team/app", "v1", &basic(ALICE.0, ALICE.1), 6).await;
    let post = |form: String| {
        let url = bw.url("/auth/token");
        async move {
            let (status, _, body) = req("POST", &url, None, Some(("application/x-www-form-urlencoded", form.into_bytes()))).await;
            (status, serde_json::from_slice::<Value>(&body).unwrap())
        }
    };
    let (status, a) = post(format!(
        "grant_type=password&service=breakwater&client_id=t&access_type=offline&scope=repository%3Ateam%2Fapp%3Apull%20registry%3Acatalog%3A*&username={}&password={}",
        BOB.0, BOB.1
    ))
    .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["scope"], "repository:team/app:pull registry:catalog:*");
    let refresh = a["refresh_token"].as_str().unwrap().to_string();
    let (status, b) = post(format!("grant_type=refresh_token&service=breakwater&client_id=t&refresh_token={refresh}&scope=repository:team/app:pull")).await;
    assert_eq!(status, 200, "{b}");
    let t = b["access_token"].as_str().unwrap();
    assert_eq!(req("GET", &bw.url("/v2/team/app/manifests/v1"), Some(&format!("Bearer {t}")), None).await.0, 200);
    // Bad requests get OAuth2 errors.
    assert_eq!(post("grant_type=password&service=breakwater&username=bob&password=nope".into()).await.0, 401);
    assert_eq!(post("grant_type=client_credentials&service=breakwater".into()).await.1["error"], "unsupported_grant_type");
    assert_eq!(post("grant_type=password&service=elsewhere&username=bob&password=x".into()).await.0, 400);

    // bob leaves the htpasswd file: his refresh token stops working once the file is re-read.
    images::run(Command::new("htpasswd").arg("-D").arg(dir.path().join("htpasswd")).arg(BOB.0));
    let mut refused = false;
    for _ in 0..100 {
        let (status, _) = post(format!("grant_type=refresh_token&service=breakwater&client_id=t&refresh_token={refresh}")).await;
        if status == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(refused, "a removed user's refresh token still works");
    assert_eq!(token(&bw, Some(BOB), &[]).await.0, 401);
    assert_eq!(token(&bw, Some(ALICE), &[]).await.0, 200, "the others are still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_limited_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let bw = Breakwater::start_with(&["--config", config(dir.path(), "").to_str().unwrap()]);
    for _ in 0..10 {
        assert_eq!(token(&bw, Some((BOB.0, "guess")), &[]).await.0, 401);
    }
    // Past the limit even the right password is refused for a while, at the token endpoint and on the API.
    assert_eq!(token(&bw, Some(BOB), &[]).await.0, 429);
    let (status, headers, body) = req("GET", &bw.url("/v2/"), Some(&basic(BOB.0, BOB.1)), None).await;
    assert_eq!((status, error_code(&body).as_str()), (429, "TOOMANYREQUESTS"));
    assert_eq!(headers["retry-after"], "60");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_count_for_token_holders_as_for_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let file = htpasswd(dir.path(), &[ALICE, BOB]);
    let cfg = dir.path().join("bw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[auth]\nhtpasswd = \"{}\"\nadmin_groups = [\"ops\"]\n\n[auth.groups]\nops = [\"alice\"]\nreaders = [\"bob\"]\n\n\
             [[auth.access]]\nrepositories = [\"**\"]\nusers = [\"alice\"]\nactions = [\"pull\", \"push\"]\n\n\
             [[auth.access]]\nrepositories = [\"shared/**\"]\ngroups = [\"readers\"]\nactions = [\"pull\"]\n",
            file.display()
        ),
    )
    .unwrap();
    let bw = Breakwater::start_with(&["--config", cfg.to_str().unwrap()]);
    let alice = basic(ALICE.0, ALICE.1);
    push(&bw, "shared/lib", "v1", &alice, 8).await;
    push(&bw, "private/app", "v1", &alice, 9).await;
    // bob's rights come from his group `readers` (pull of shared/**), alice's admin rights from `ops`.
    let (_, t) = token(&bw, Some(BOB), &["registry:catalog:*", "repository:shared/lib:pull", "repository:private/app:pull"]).await;
    assert_eq!(access_of(t["token"].as_str().unwrap()).as_array().unwrap().len(), 2, "catalog and shared/lib");
    let (_, _, body) = req("GET", &bw.url("/v2/_catalog"), Some(&bearer(&t)), None).await;
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["repositories"], serde_json::json!(["shared/lib"]));
    assert_eq!(req("GET", &bw.url("/api/replication"), Some(&bearer(&t)), None).await.0, 403);
    let (_, admin) = token(&bw, Some(ALICE), &[]).await;
    assert_eq!(req("GET", &bw.url("/api/replication"), Some(&bearer(&admin)), None).await.0, 200, "admin through a group, with a token");
    assert_eq!(req("GET", &bw.url("/v2/shared/lib/manifests/v1"), Some(&bearer(&t)), None).await.0, 200);
    let (status, _, body) = req("GET", &bw.url("/v2/private/app/manifests/v1"), Some(&bearer(&t)), None).await;
    assert_eq!((status, error_code(&body).as_str()), (403, "DENIED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_podman_log_in_push_and_pull_through_the_token_flow() {
    let dir = images::scratch();
    let tmp = dir.path();
    let bw = Breakwater::start_with(&["--config", config(tmp, "").to_str().unwrap()]);
    let layout = tmp.join("src");
    let digest = images::build_image(&layout, "v1", images::host_arch(), &[("etc/motd", "behind a login\n")]);
    let authfile = |who: &str| tmp.join(format!("auth-{who}.json"));
    let login = |who: (&str, &str)| {
        images::output(
            images::skopeo(tmp)
                .args(["login", "--tls-verify=false", "--authfile"])
                .arg(authfile(who.0))
                .args(["--username", who.0, "--password", who.1, &bw.addr]),
        )
    };
    assert!(login(ALICE).status.success(), "skopeo login: {}", String::from_utf8_lossy(&login(ALICE).stderr));
    let bad = login((BOB.0, "wrong"));
    assert!(!bad.status.success(), "a wrong password logs in");
    assert!(login(BOB).status.success());

    let dest = format!("docker://{}/team/app:v1", bw.addr);
    // Without credentials the push is refused.
    let anonymous = images::output(images::skopeo(tmp).args(["copy", "--dest-tls-verify=false", &images::oci_ref(&layout, "v1"), &dest]));
    assert!(!anonymous.status.success(), "an anonymous push went through");
    images::skopeo_copy(tmp, &["--dest-authfile", authfile("alice").to_str().unwrap()], &images::oci_ref(&layout, "v1"), &dest);
    // bob may pull it back, and may not push.
    let back = tmp.join("back");
    images::skopeo_copy(tmp, &["--src-authfile", authfile("bob").to_str().unwrap()], &dest, &images::oci_ref(&back, "v1"));
    assert_eq!(images::layout_digest(&back, "v1"), digest);
    let denied = images::output(images::skopeo(tmp).args(["copy", "--dest-tls-verify=false", "--dest-authfile"]).arg(authfile("bob")).args([
        &images::oci_ref(&layout, "v1"),
        &format!("docker://{}/team/bobs:v1", bw.addr),
    ]));
    assert!(!denied.status.success(), "bob pushed");
    assert!(String::from_utf8_lossy(&denied.stderr).to_lowercase().contains("denied"), "{}", String::from_utf8_lossy(&denied.stderr));

    let podman = Podman::new();
    let podman_auth = podman.dir.path().join("auth.json");
    images::run(podman.cmd().args(["login", "--tls-verify=false", "--authfile"]).arg(&podman_auth).args(["-u", BOB.0, "-p", BOB.1, &bw.addr]));
    let image = format!("{}/team/app:v1", bw.addr);
    images::run(podman.cmd().args(["pull", "--tls-verify=false", "--authfile"]).arg(&podman_auth).arg(&image));
    assert_eq!(podman.inspect(&image)["Digest"], digest.as_str());
}

#[test]
fn containerd_pulls_with_credentials_through_the_oauth2_form() {
    let dir = images::scratch();
    let tmp = dir.path();
    let log = tmp.join("breakwater.log");
    let cfg = config(tmp, "");
    let bw = Breakwater::start_logged(&["--config", cfg.to_str().unwrap()], "breakwater=info", &log);
    let layout = tmp.join("src");
    let digest = images::build_image(&layout, "v1", images::host_arch(), &[("etc/motd", "containerd logs in\n")]);
    let creds = format!("{}:{}", ALICE.0, ALICE.1);
    images::skopeo_copy(tmp, &["--dest-creds", &creds], &images::oci_ref(&layout, "v1"), &format!("docker://{}/team/app:v1", bw.addr));

    let ctrd = common::containerd::Containerd::start();
    let image = format!("{}/team/app:v1", bw.addr);
    let refused = ctrd.ctr().args(["images", "pull", "--plain-http", "--snapshotter", "native", &image]).output().unwrap();
    assert!(!refused.status.success(), "containerd pulled without credentials");
    images::run(ctrd.ctr().args(["images", "pull", "--plain-http", "--snapshotter", "native", "--user", &format!("{}:{}", BOB.0, BOB.1), &image]));
    assert_eq!(ctrd.image_digest(&image).as_deref(), Some(digest.as_str()));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l.contains("method=POST") && l.contains("path=\"/auth/token\"") && l.contains("status=200")),
        "containerd used the OAuth2 form"
    );
}

#[test]
fn skopeo_uses_basic_mode() {
    let dir = images::scratch();
    let tmp = dir.path();
    let file = htpasswd(tmp, &[ALICE]);
    let bw = Breakwater::start_with(&["--htpasswd", file.to_str().unwrap(), "--auth", "basic"]);
    let layout = tmp.join("src");
    let digest = images::build_image(&layout, "v1", images::host_arch(), &[("etc/motd", "basic\n")]);
    let dest = format!("docker://{}/team/app:v1", bw.addr);
    let anonymous = images::output(images::skopeo(tmp).args(["copy", "--dest-tls-verify=false", &images::oci_ref(&layout, "v1"), &dest]));
    assert!(!anonymous.status.success(), "an anonymous push went through");
    let creds = format!("{}:{}", ALICE.0, ALICE.1);
    images::skopeo_copy(tmp, &["--dest-creds", &creds], &images::oci_ref(&layout, "v1"), &dest);
    let back = tmp.join("back");
    images::skopeo_copy(tmp, &["--src-creds", &creds], &dest, &images::oci_ref(&back, "v1"));
    assert_eq!(images::layout_digest(&back, "v1"), digest);
    let wrong = images::output(images::skopeo(tmp).args(["inspect", "--tls-verify=false", "--creds", "alice:nope", &dest]));
    assert!(!wrong.status.success(), "a wrong password pulled");
    // The challenge is Basic, and no token is issued in this mode's place.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, headers, _) = rt.block_on(req("GET", &bw.url("/v2/"), None, None));
    assert_eq!((status, challenge(&headers).as_str()), (401, "Basic realm=\"breakwater\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_refuses_pushes_that_would_shadow_its_default_upstream() {
    // No access control here: shadowing is refused for everyone, unless allowed by name.
    let bw = Breakwater::start_with(&["--upstream", "hub=http://127.0.0.1:9", "--default-upstream", "hub", "--allow-shadowing", "mine/**"]);
    let blob = b"layer".to_vec();
    for name in ["library/alpine", "team/app"] {
        let url = bw.url(&format!("/v2/{name}/blobs/uploads/?digest={}", sha256(&blob)));
        let (status, _, body) = req("POST", &url, None, Some(("application/octet-stream", blob.clone()))).await;
        assert_eq!((status, error_code(&body).as_str()), (403, "DENIED"), "{name}");
        let (status, _, _) = req("PUT", &bw.url(&format!("/v2/{name}/manifests/latest")), None, Some((OCI_MANIFEST, b"{}".to_vec()))).await;
        assert_eq!(status, 403, "{name}");
    }
    let url = bw.url(&format!("/v2/mine/app/blobs/uploads/?digest={}", sha256(&blob)));
    assert_eq!(req("POST", &url, None, Some(("application/octet-stream", blob.clone()))).await.0, 201);
    // The upstream's own namespace stays read-only as before.
    let url = bw.url(&format!("/v2/hub/library/alpine/blobs/uploads/?digest={}", sha256(&blob)));
    assert_eq!(req("POST", &url, None, Some(("application/octet-stream", blob))).await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_hold_no_secret_and_an_audit_line_per_write() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("breakwater.log");
    let cfg = config(dir.path(), "");
    let bw = Breakwater::start_logged(&["--config", cfg.to_str().unwrap()], "debug", &log);
    let alice = basic(ALICE.0, ALICE.1);
    let digest = push(&bw, "team/app", "v1", &alice, 7).await;
    let (_, t) = token(&bw, Some(ALICE), &["repository:team/app:pull,push,delete"]).await;
    let jwt = t["token"].as_str().unwrap().to_string();
    assert_eq!(req("GET", &bw.url("/v2/team/app/manifests/v1"), Some(&bearer(&t)), None).await.0, 200);
    assert_eq!(req("DELETE", &bw.url(&format!("/v2/team/app/manifests/{digest}")), Some(&bearer(&t)), None).await.0, 202);
    token(&bw, Some((BOB.0, "a-wrong-guess-123")), &[]).await;
    let form = format!("grant_type=password&service=breakwater&client_id=t&access_type=offline&username={}&password={}", BOB.0, BOB.1);
    let (_, _, body) = req("POST", &bw.url("/auth/token"), None, Some(("application/x-www-form-urlencoded", form.into_bytes()))).await;
    let refresh = serde_json::from_slice::<Value>(&body).unwrap()["refresh_token"].as_str().unwrap().to_string();
    drop(bw);

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("request"), "the log has request lines");
    let basic_value = alice.trim_start_matches("Basic ");
    for secret in [ALICE.1, BOB.1, "a-wrong-guess-123", jwt.as_str(), refresh.as_str(), basic_value] {
        assert!(!text.contains(secret), "the log holds a secret: {secret}");
    }
    assert!(!text.to_lowercase().contains("authorization"), "the log mentions an Authorization header");
    // Who pushed, moved a tag and deleted what.
    let audit: Vec<&str> = text.lines().filter(|l| l.contains("breakwater::audit")).collect();
    assert_eq!(audit.iter().filter(|l| l.contains("push blob") && l.contains("subject=\"alice\"")).count(), 2, "{audit:#?}");
    assert!(audit.iter().any(|l| l.contains("push manifest") && l.contains("repository=\"team/app\"") && l.contains(&digest)), "{audit:#?}");
    assert!(audit.iter().any(|l| l.contains("delete manifest") && l.contains(&digest)), "{audit:#?}");
}

/// `breakwater token ...` on the server's data directory; returns stdout.
fn token_cli(bw: &Breakwater, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .arg("token")
        .args(args)
        .arg("--data")
        .arg(bw.data.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn robots_log_in_with_their_own_grants_until_revoked() {
    let dir = images::scratch();
    let tmp = dir.path();
    let bw = Breakwater::start_with(&["--config", config(tmp, "").to_str().unwrap()]);
    let out = token_cli(&bw, &["create", "ci", "--scope", "ci/**:pull,push", "--expires", "30d"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(secret.starts_with("bwr_"), "{secret}");
    assert!(!token_cli(&bw, &["create", "ci", "--scope", "x:pull"]).status.success(), "a robot name is taken once");

    let layout = tmp.join("src");
    let digest = images::build_image(&layout, "v1", images::host_arch(), &[("etc/motd", "pushed by a robot\n")]);
    let creds = format!("robot$ci:{secret}");
    images::skopeo_copy(tmp, &["--dest-creds", &creds], &images::oci_ref(&layout, "v1"), &format!("docker://{}/ci/app:v1", bw.addr));
    let back = tmp.join("back");
    images::skopeo_copy(tmp, &["--src-creds", &creds], &format!("docker://{}/ci/app:v1", bw.addr), &images::oci_ref(&back, "v1"));
    assert_eq!(images::layout_digest(&back, "v1"), digest);
    // Its grants only: not team/**, which every user may pull.
    let outside = images::output(images::skopeo(tmp).args(["copy", "--dest-tls-verify=false", "--dest-creds", &creds, &images::oci_ref(&layout, "v1")]).arg(format!("docker://{}/team/app:v1", bw.addr)));
    assert!(!outside.status.success(), "the robot pushed outside its scope");

    let list = String::from_utf8(token_cli(&bw, &["list"]).stdout).unwrap();
    assert!(list.lines().any(|l| l.starts_with("robot$ci") && l.contains("active") && l.contains("ci/**:pull,push")), "{list}");
    assert!(!list.contains(&secret), "the list shows no secret");
    assert!(token_cli(&bw, &["revoke", "robot$ci"]).status.success());
    assert!(!token_cli(&bw, &["revoke", "ci"]).status.success(), "revoking twice is an error");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(token(&bw, Some(("robot$ci", &secret)), &["repository:ci/app:pull"])).0, 401, "a revoked robot is refused");
    let refused = images::output(images::skopeo(tmp).args(["inspect", "--tls-verify=false", "--creds", &creds]).arg(format!("docker://{}/ci/app:v1", bw.addr)));
    assert!(!refused.status.success(), "a revoked robot pulled");
    assert!(String::from_utf8(token_cli(&bw, &["list"]).stdout).unwrap().contains("revoked"));
}

/// A token server of its own, as an existing auth service would be: it issues ES256 tokens granting whatever
/// scope is asked to anyone with a password, for service `registry.test`.
struct TestIssuer {
    addr: String,
    key: rcgen::KeyPair,
    _runtime: tokio::runtime::Runtime,
}

impl TestIssuer {
    fn start() -> TestIssuer {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = key.serialize_pem();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::get(move |q: axum::extract::Query<Vec<(String, String)>>, headers: axum::http::HeaderMap| {
                let pem = pem.clone();
                async move {
                    if !headers.contains_key("authorization") {
                        return (axum::http::StatusCode::UNAUTHORIZED, String::new());
                    }
                    let access: Vec<Value> = q
                        .0
                        .iter()
                        .filter(|(k, _)| k == "scope")
                        .filter_map(|(_, v)| {
                            let mut parts = v.rsplitn(2, ':');
                            let actions = parts.next()?;
                            let name = parts.next()?.strip_prefix("repository:")?;
                            Some(serde_json::json!({"type": "repository", "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
                        })
                        .collect();
                    let token = issue_es256(&pem, "registry.test", 300, access);
                    (axum::http::StatusCode::OK, serde_json::json!({ "token": token }).to_string())
                }
            }),
        );
        runtime.spawn(async move { axum::serve(listener, app).await });
        TestIssuer { addr, key, _runtime: runtime }
    }
}

fn issue_es256(pem: &str, aud: &str, ttl: i64, access: Vec<Value>) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = serde_json::json!({"iss": "test-issuer", "sub": "someone", "aud": aud, "exp": now + ttl, "iat": now, "access": access});
    let key = jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256), &claims, &key).unwrap()
}

#[test]
fn tokens_of_an_external_issuer_are_accepted_and_others_refused() {
    let dir = images::scratch();
    let tmp = dir.path();
    let issuer = TestIssuer::start();
    // The issuer's certificate, as distribution's rootcertbundle holds it.
    let cert = rcgen::CertificateParams::new(vec!["issuer.test".to_string()]).unwrap().self_signed(&issuer.key).unwrap();
    std::fs::write(tmp.join("bundle.pem"), cert.pem()).unwrap();
    let cfg = tmp.join("bw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[auth]\nservice = \"registry.test\"\n\n[auth.issuer]\nrealm = \"http://{}/token\"\nissuer = \"test-issuer\"\nkeys = \"{}\"\n",
            issuer.addr,
            tmp.join("bundle.pem").display()
        ),
    )
    .unwrap();
    let bw = Breakwater::start_with(&["--config", cfg.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, headers, _) = rt.block_on(req("GET", &bw.url("/v2/x/manifests/v1"), None, None));
    assert_eq!(status, 401);
    assert!(challenge(&headers).starts_with(&format!("Bearer realm=\"http://{}/token\",service=\"registry.test\"", issuer.addr)), "{}", challenge(&headers));

    // skopeo follows the challenge to the other server and comes back with its token.
    let layout = tmp.join("src");
    let digest = images::build_image(&layout, "v1", images::host_arch(), &[("etc/motd", "external\n")]);
    let dest = format!("docker://{}/ext/app:v1", bw.addr);
    images::skopeo_copy(tmp, &["--dest-creds", "someone:anything"], &images::oci_ref(&layout, "v1"), &dest);
    let back = tmp.join("back");
    images::skopeo_copy(tmp, &["--src-creds", "someone:anything"], &dest, &images::oci_ref(&back, "v1"));
    assert_eq!(images::layout_digest(&back, "v1"), digest);

    let pull = vec![serde_json::json!({"type": "repository", "name": "ext/app", "actions": ["pull"]})];
    let own_pem = issuer.key.serialize_pem();
    let good = issue_es256(&own_pem, "registry.test", 300, pull.clone());
    assert_eq!(rt.block_on(req("GET", &bw.url("/v2/ext/app/manifests/v1"), Some(&format!("Bearer {good}")), None)).0, 200);
    let stranger = rcgen::KeyPair::generate().unwrap().serialize_pem();
    for (what, bad) in [
        ("another key", issue_es256(&stranger, "registry.test", 300, pull.clone())),
        ("another service", issue_es256(&own_pem, "elsewhere", 300, pull.clone())),
        ("expired", issue_es256(&own_pem, "registry.test", -120, pull.clone())),
    ] {
        assert_eq!(rt.block_on(req("GET", &bw.url("/v2/ext/app/manifests/v1"), Some(&format!("Bearer {bad}")), None)).0, 401, "{what}");
    }
    // A token for pull only does not push.
    let (status, _, _) = rt.block_on(req("POST", &bw.url("/v2/ext/app/blobs/uploads/"), Some(&format!("Bearer {good}")), None));
    assert!(status == 401 || status == 403, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_and_warm_log_in_to_a_protected_breakwater() {
    let source = common::Distribution::start();
    let src = format!("http://{}", source.addr);
    let image = common::oci::push_image(&src, "team/lib", "v1", &[3_000], 41).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "\n[[upstream]]\nname = \"up\"\nurl = \"{src}\"\n\n[[replication]]\nname = \"in\"\nfrom = \"{src}\"\nto = \"local\"\n\
         include = [\"team/**\"]\nto_username = \"{}\"\nto_password = \"{}\"\n",
        ALICE.0, ALICE.1
    );
    // The replication and upstream tables go after [auth]'s rules: write the policy file, then append.
    let cfg = config(dir.path(), "");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&extra);
    text = text.replace("repositories = [\"team/**\"]\nusers = [\"bob\"]", "repositories = [\"team/**\", \"up/**\"]\nusers = [\"bob\"]");
    std::fs::write(&cfg, text).unwrap();
    let bw = Breakwater::start_with(&["--config", cfg.to_str().unwrap()]);
    let root = basic(ROOT.0, ROOT.1);

    assert_eq!(req("POST", &bw.url("/api/replication/in/run"), Some(&basic(ALICE.0, ALICE.1)), None).await.0, 403, "only admins start runs");
    assert_eq!(req("POST", &bw.url("/api/replication/in/run"), Some(&root), None).await.0, 202);
    let mut done = Value::Null;
    for _ in 0..2000 {
        let (_, _, body) = req("GET", &bw.url("/api/replication/in"), Some(&root), None).await;
        done = serde_json::from_slice(&body).unwrap();
        if done["running"] == false && done["progress"]["status"] != "never run" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!((done["progress"]["status"].as_str(), done["progress"]["copied"].as_u64()), (Some("finished"), Some(1)), "{done}");
    let (status, headers, _) = req("GET", &bw.url("/v2/team/lib/manifests/v1"), Some(&basic(BOB.0, BOB.1)), None).await;
    assert_eq!((status, headers["docker-content-digest"].to_str().unwrap()), (200, image.digest.as_str()));

    // `breakwater warm` pulls through the cache with bob's password, by the token flow.
    let warm = |creds: Option<(&str, &str)>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_breakwater"));
        cmd.args(["warm", "--server", &bw.url(""), "up/team/lib:v1"]).env("RUST_LOG", "warn");
        if let Some((u, p)) = creds {
            cmd.args(["--username", u, "--password", p]);
        }
        cmd.output().unwrap()
    };
    assert!(!warm(None).status.success(), "warm without credentials");
    let out = warm(Some(BOB));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warmed 1 manifests and 2 blobs"), "{}", String::from_utf8_lossy(&out.stderr));
}
