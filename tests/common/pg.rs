//! A fresh, uniquely named PostgreSQL database on 127.0.0.1:5432 (trust auth), dropped when the guard goes.
#![allow(dead_code)]

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub struct PgDatabase {
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        sqlx::any::install_default_drivers();
        let name = format!("bw_test_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::AnyPool::connect(PG_ADMIN_URL).await.expect("PostgreSQL on 127.0.0.1:5432");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
        admin.close().await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        PgDatabase { name, url }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside the test's runtime; a small one of its own removes the database.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(admin) = sqlx::AnyPool::connect(PG_ADMIN_URL).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await;
                }
            });
        })
        .join()
        .unwrap();
    }
}
