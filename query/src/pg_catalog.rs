//! What PostgreSQL clients read about the database: `pg_catalog` and an
//! `information_schema` with PostgreSQL's type names, built from the session's own view
//! of the database. A table the caller's role may not read is not in the session's
//! schema, so it is in neither of these; columns a role may not see are left out the
//! same way. Nothing here matches query text: clients query these tables with SQL.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Int16Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};

/// The namespace oids PostgreSQL uses.
const PG_CATALOG_OID: i64 = 11;
const PUBLIC_OID: i64 = 2200;
const INFORMATION_SCHEMA_OID: i64 = 13_000;
/// The database's oid and the owner every object has.
const DATABASE_OID: i64 = 16_384;
const OWNER_OID: i64 = 10;
/// The name the owner has.
pub const OWNER: &str = "historian";

/// How values of an Arrow type appear to PostgreSQL clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgType {
    /// `pg_type.oid`.
    pub oid: u32,
    /// `pg_type.typname` (`information_schema.columns.udt_name`).
    pub name: &'static str,
    /// `information_schema.columns.data_type`, `format_type()`.
    pub sql_name: &'static str,
    /// `pg_type.typlen`.
    pub len: i16,
}

const fn t(oid: u32, name: &'static str, sql_name: &'static str, len: i16) -> PgType {
    PgType {
        oid,
        name,
        sql_name,
        len,
    }
}

/// The PostgreSQL types results use; other Arrow types travel as text.
pub const TYPES: &[PgType] = &[
    t(16, "bool", "boolean", 1),
    t(17, "bytea", "bytea", -1),
    t(19, "name", "name", 64),
    t(20, "int8", "bigint", 8),
    t(21, "int2", "smallint", 2),
    t(23, "int4", "integer", 4),
    t(25, "text", "text", -1),
    t(26, "oid", "oid", 4),
    t(700, "float4", "real", 4),
    t(701, "float8", "double precision", 8),
    t(1009, "_text", "text[]", -1),
    t(1043, "varchar", "character varying", -1),
    t(1082, "date", "date", 4),
    t(1114, "timestamp", "timestamp without time zone", 8),
    t(1184, "timestamptz", "timestamp with time zone", 8),
    t(1700, "numeric", "numeric", -1),
];

fn by_oid(oid: u32) -> PgType {
    TYPES
        .iter()
        .copied()
        .find(|t| t.oid == oid)
        .unwrap_or(TYPES[6])
}

/// The PostgreSQL type an Arrow type is presented as.
pub fn pg_type_of(data_type: &DataType) -> PgType {
    use DataType::*;
    let oid = match data_type {
        Boolean => 16,
        Int8 | Int16 | UInt8 => 21,
        Int32 | UInt16 => 23,
        Int64 | UInt32 | UInt64 => 20,
        Float16 | Float32 => 700,
        Float64 | Decimal32(..) | Decimal64(..) | Decimal128(..) | Decimal256(..) => 701,
        Binary | LargeBinary | BinaryView | FixedSizeBinary(_) => 17,
        Date32 | Date64 => 1082,
        Timestamp(_, None) => 1114,
        Timestamp(_, Some(_)) => 1184,
        List(item) | LargeList(item) | ListView(item)
            if matches!(item.data_type(), Utf8 | LargeUtf8 | Utf8View) =>
        {
            1009
        }
        _ => 25,
    };
    by_oid(oid)
}

/// The `format_type(oid, typmod)` of an oid.
pub fn format_type(oid: i64) -> Option<&'static str> {
    TYPES
        .iter()
        .find(|t| i64::from(t.oid) == oid)
        .map(|t| t.sql_name)
}

/// A stable oid for a table: the same name has the same oid in every session, so a
/// client can look a table up in one statement and describe it in the next.
pub fn table_oid(name: &str) -> i64 {
    // FNV-1a, folded above the oids PostgreSQL reserves.
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    100_000 + i64::from(h % 2_000_000_000)
}

/// One table as the catalogs describe it.
#[derive(Debug)]
struct TableInfo {
    name: String,
    oid: i64,
    schema: SchemaRef,
}

async fn tables(public: &dyn SchemaProvider) -> Result<Vec<TableInfo>> {
    let mut names = public.table_names();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        if let Some(table) = public.table(&name).await? {
            out.push(TableInfo {
                oid: table_oid(&name),
                schema: table.schema(),
                name,
            });
        }
    }
    Ok(out)
}

/// Column builders for one catalog table.
struct Builder {
    fields: Vec<Field>,
    columns: Vec<ArrayRef>,
}

impl Builder {
    fn new() -> Self {
        Builder {
            fields: Vec::new(),
            columns: Vec::new(),
        }
    }

    fn text<S: AsRef<str>>(mut self, name: &str, values: Vec<Option<S>>) -> Self {
        self.fields.push(Field::new(name, DataType::Utf8, true));
        self.columns.push(Arc::new(
            values
                .iter()
                .map(|v| v.as_ref().map(|s| s.as_ref()))
                .collect::<StringArray>(),
        ));
        self
    }

    fn int(mut self, name: &str, values: Vec<i64>) -> Self {
        self.fields.push(Field::new(name, DataType::Int64, false));
        self.columns.push(Arc::new(Int64Array::from(values)));
        self
    }

    fn int4(mut self, name: &str, values: Vec<i32>) -> Self {
        self.fields.push(Field::new(name, DataType::Int32, false));
        self.columns.push(Arc::new(Int32Array::from(values)));
        self
    }

    fn int2(mut self, name: &str, values: Vec<i16>) -> Self {
        self.fields.push(Field::new(name, DataType::Int16, false));
        self.columns.push(Arc::new(Int16Array::from(values)));
        self
    }

    fn bool(mut self, name: &str, values: Vec<bool>) -> Self {
        self.fields.push(Field::new(name, DataType::Boolean, false));
        self.columns.push(Arc::new(BooleanArray::from(values)));
        self
    }

    fn build(self) -> Result<Arc<dyn TableProvider>> {
        let schema = Arc::new(Schema::new(self.fields));
        let batch = RecordBatch::try_new(schema.clone(), self.columns)?;
        Ok(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))
    }
}

fn texts<S: Into<String>>(n: usize, value: S) -> Vec<Option<String>> {
    let value = value.into();
    vec![Some(value); n]
}

fn nulls(n: usize) -> Vec<Option<String>> {
    vec![None; n]
}

/// `pg_catalog` or `information_schema`, built on demand from `public`, the session's
/// view of the database.
#[derive(Debug)]
pub struct PgSchema {
    public: Arc<dyn SchemaProvider>,
    db: String,
    kind: PgSchemaKind,
    /// The session's tables, listed once however many catalog tables a query joins.
    tables: tokio::sync::OnceCell<Vec<TableInfo>>,
}

#[derive(Debug, Clone, Copy)]
enum PgSchemaKind {
    Catalog,
    InformationSchema,
}

/// The tables of `pg_catalog`.
const PG_TABLES: &[&str] = &[
    "pg_namespace",
    "pg_class",
    "pg_attribute",
    "pg_type",
    "pg_database",
    "pg_am",
    "pg_settings",
    "pg_roles",
    "pg_user",
    "pg_tables",
    "pg_views",
    "pg_matviews",
    "pg_index",
    "pg_constraint",
    "pg_attrdef",
    "pg_description",
    "pg_inherits",
    "pg_extension",
    "pg_proc",
    "pg_aggregate",
    "pg_collation",
    "pg_enum",
    "pg_range",
    "pg_tablespace",
    "pg_policy",
    "pg_trigger",
    "pg_rewrite",
    "pg_statistic_ext",
    "pg_publication",
    "pg_partitioned_table",
    "pg_foreign_table",
    "pg_sequence",
    "pg_publication_namespace",
    "pg_publication_rel",
    "pg_statistic_ext_data",
    "pg_depend",
    "pg_shdescription",
    "pg_event_trigger",
    "pg_opclass",
    "pg_operator",
    "pg_cast",
    "pg_language",
    "pg_auth_members",
    "pg_stat_activity",
    "pg_foreign_server",
    "pg_foreign_data_wrapper",
];

impl PgSchema {
    /// `pg_catalog` for the session whose tables `public` holds, in database `db`.
    pub fn catalog(public: Arc<dyn SchemaProvider>, db: &str) -> Self {
        Self::new(public, db, PgSchemaKind::Catalog)
    }

    /// `information_schema` as PostgreSQL presents it (its type names, its table types),
    /// for the session whose tables `public` holds.
    pub fn information_schema(public: Arc<dyn SchemaProvider>, db: &str) -> Self {
        Self::new(public, db, PgSchemaKind::InformationSchema)
    }

    fn new(public: Arc<dyn SchemaProvider>, db: &str, kind: PgSchemaKind) -> Self {
        PgSchema {
            public,
            db: db.to_string(),
            kind,
            tables: tokio::sync::OnceCell::new(),
        }
    }

    fn names(&self) -> &'static [&'static str] {
        match self.kind {
            PgSchemaKind::Catalog => PG_TABLES,
            PgSchemaKind::InformationSchema => INFO_TABLES,
        }
    }

    async fn build(&self, name: &str) -> Result<Arc<dyn TableProvider>> {
        let tables = self
            .tables
            .get_or_try_init(|| tables(self.public.as_ref()))
            .await?;
        match self.kind {
            PgSchemaKind::Catalog => self.catalog_table(name, tables),
            PgSchemaKind::InformationSchema => self.information_table(name, tables),
        }
    }

    fn catalog_table(&self, name: &str, tables: &[TableInfo]) -> Result<Arc<dyn TableProvider>> {
        let n = tables.len();
        match name {
            "pg_namespace" => Builder::new()
                .int(
                    "oid",
                    vec![PG_CATALOG_OID, PUBLIC_OID, INFORMATION_SCHEMA_OID],
                )
                .text(
                    "nspname",
                    vec![
                        Some("pg_catalog"),
                        Some("public"),
                        Some("information_schema"),
                    ],
                )
                .int("nspowner", vec![OWNER_OID; 3])
                .text("nspacl", nulls(3))
                .build(),
            "pg_class" => Builder::new()
                .int("oid", tables.iter().map(|t| t.oid).collect())
                .text(
                    "relname",
                    tables.iter().map(|t| Some(t.name.clone())).collect(),
                )
                .int("relnamespace", vec![PUBLIC_OID; n])
                .int("reltype", vec![0; n])
                .int("relowner", vec![OWNER_OID; n])
                .int("relam", vec![2; n])
                .int("relfilenode", vec![0; n])
                .int("reltablespace", vec![0; n])
                .int4("relpages", vec![0; n])
                .text("reltuples", texts(n, "-1"))
                .int("reltoastrelid", vec![0; n])
                .bool("relhasindex", vec![false; n])
                .bool("relisshared", vec![false; n])
                .text("relpersistence", texts(n, "p"))
                .text("relkind", texts(n, "r"))
                .int2(
                    "relnatts",
                    tables
                        .iter()
                        .map(|t| t.schema.fields().len() as i16)
                        .collect(),
                )
                .int2("relchecks", vec![0; n])
                .bool("relhasrules", vec![false; n])
                .bool("relhastriggers", vec![false; n])
                .bool("relhassubclass", vec![false; n])
                .bool("relrowsecurity", vec![false; n])
                .bool("relforcerowsecurity", vec![false; n])
                .bool("relispopulated", vec![true; n])
                .text("relreplident", texts(n, "d"))
                .bool("relispartition", vec![false; n])
                .int("reloftype", vec![0; n])
                .text("relacl", nulls(n))
                .text("reloptions", nulls(n))
                .build(),
            "pg_attribute" => {
                let mut b = Vec::new();
                for t in tables {
                    for (i, f) in t.schema.fields().iter().enumerate() {
                        b.push((
                            t.oid,
                            f.name().clone(),
                            pg_type_of(f.data_type()),
                            i,
                            f.is_nullable(),
                        ));
                    }
                }
                Builder::new()
                    .int("attrelid", b.iter().map(|r| r.0).collect())
                    .text("attname", b.iter().map(|r| Some(r.1.clone())).collect())
                    .int("atttypid", b.iter().map(|r| i64::from(r.2.oid)).collect())
                    .int2("attlen", b.iter().map(|r| r.2.len).collect())
                    .int2("attnum", b.iter().map(|r| r.3 as i16 + 1).collect())
                    .int4("atttypmod", vec![-1; b.len()])
                    .int2("attndims", vec![0; b.len()])
                    .bool("attnotnull", b.iter().map(|r| !r.4).collect())
                    .bool("atthasdef", vec![false; b.len()])
                    .bool("attisdropped", vec![false; b.len()])
                    .text("attidentity", texts(b.len(), ""))
                    .text("attgenerated", texts(b.len(), ""))
                    .int("attcollation", vec![0; b.len()])
                    .bool("attislocal", vec![true; b.len()])
                    .build()
            }
            "pg_type" => Builder::new()
                .int("oid", TYPES.iter().map(|t| i64::from(t.oid)).collect())
                .text("typname", TYPES.iter().map(|t| Some(t.name)).collect())
                .int("typnamespace", vec![PG_CATALOG_OID; TYPES.len()])
                .int("typowner", vec![OWNER_OID; TYPES.len()])
                .int2("typlen", TYPES.iter().map(|t| t.len).collect())
                .text("typtype", texts(TYPES.len(), "b"))
                .text(
                    "typcategory",
                    TYPES
                        .iter()
                        .map(|t| {
                            Some(match t.oid {
                                16 => "B",
                                20 | 21 | 23 | 26 | 700 | 701 | 1700 => "N",
                                1082 | 1114 | 1184 => "D",
                                1009 => "A",
                                _ => "S",
                            })
                        })
                        .collect(),
                )
                .int("typrelid", vec![0; TYPES.len()])
                .int(
                    "typelem",
                    TYPES
                        .iter()
                        .map(|t| if t.oid == 1009 { 25 } else { 0 })
                        .collect(),
                )
                .int(
                    "typarray",
                    TYPES
                        .iter()
                        .map(|t| if t.oid == 25 { 1009 } else { 0 })
                        .collect(),
                )
                .int("typbasetype", vec![0; TYPES.len()])
                .int4("typtypmod", vec![-1; TYPES.len()])
                .bool("typnotnull", vec![false; TYPES.len()])
                .int("typcollation", vec![0; TYPES.len()])
                .text("typdelim", texts(TYPES.len(), ","))
                .build(),
            "pg_database" => Builder::new()
                .int("oid", vec![DATABASE_OID])
                .text("datname", vec![Some(self.db.clone())])
                .int("datdba", vec![OWNER_OID])
                .int4("encoding", vec![6])
                .text("datcollate", vec![Some("C.UTF-8")])
                .text("datctype", vec![Some("C.UTF-8")])
                .bool("datistemplate", vec![false])
                .bool("datallowconn", vec![true])
                .int4("datconnlimit", vec![-1])
                .int("dattablespace", vec![1663])
                .text("datacl", nulls(1))
                .build(),
            "pg_am" => Builder::new()
                .int("oid", vec![2])
                .text("amname", vec![Some("heap")])
                .text("amtype", vec![Some("t")])
                .build(),
            "pg_settings" => {
                let names: Vec<&str> = crate::functions::postgres::SETTINGS
                    .iter()
                    .map(|(k, _)| *k)
                    .collect();
                Builder::new()
                    .text("name", names.iter().map(|n| Some(*n)).collect())
                    .text(
                        "setting",
                        crate::functions::postgres::SETTINGS
                            .iter()
                            .map(|(_, v)| Some(*v))
                            .collect(),
                    )
                    .build()
            }
            "pg_roles" | "pg_user" => {
                let name_col = if name == "pg_roles" {
                    "rolname"
                } else {
                    "usename"
                };
                Builder::new()
                    .int("oid", vec![OWNER_OID])
                    .text(name_col, vec![Some(OWNER)])
                    .bool("rolsuper", vec![false])
                    .bool("rolcanlogin", vec![true])
                    .build()
            }
            "pg_tables" => Builder::new()
                .text("schemaname", texts(n, "public"))
                .text(
                    "tablename",
                    tables.iter().map(|t| Some(t.name.clone())).collect(),
                )
                .text("tableowner", texts(n, OWNER))
                .text("tablespace", nulls(n))
                .bool("hasindexes", vec![false; n])
                .bool("hasrules", vec![false; n])
                .bool("hastriggers", vec![false; n])
                .bool("rowsecurity", vec![false; n])
                .build(),
            other => empty(other),
        }
    }
}

/// Whether `table` is a table of `pg_catalog` (PostgreSQL finds these unqualified).
pub fn is_catalog_table(table: &str) -> bool {
    PG_TABLES.contains(&table)
}

/// The `pg_catalog` tables that are always empty here: Historian has no indexes,
/// constraints, defaults, comments, inheritance, extensions, collations or triggers.
pub fn is_always_empty(table: &str) -> bool {
    PG_TABLES.contains(&table)
        && !matches!(
            table,
            "pg_namespace"
                | "pg_class"
                | "pg_attribute"
                | "pg_type"
                | "pg_database"
                | "pg_am"
                | "pg_settings"
                | "pg_roles"
                | "pg_user"
                | "pg_tables"
        )
}

/// The catalog tables that are always empty here (no indexes, constraints, views, ...),
/// with the columns clients filter and join on.
fn empty(name: &str) -> Result<Arc<dyn TableProvider>> {
    let columns: &[&str] = match name {
        "pg_views" | "pg_matviews" => &["schemaname", "viewname", "matviewname", "definition"],
        "pg_index" => &["indexrelid", "indrelid", "indisprimary", "indisunique"],
        "pg_constraint" => &["oid", "conname", "conrelid", "contype", "confrelid"],
        "pg_attrdef" => &["oid", "adrelid", "adnum", "adbin"],
        "pg_description" => &["objoid", "classoid", "objsubid", "description"],
        "pg_inherits" => &["inhrelid", "inhparent", "inhseqno"],
        "pg_extension" => &["oid", "extname", "extversion", "extowner"],
        "pg_proc" => &["oid", "proname", "pronamespace", "prorettype", "pronargs"],
        "pg_aggregate" => &["aggfnoid", "aggkind"],
        "pg_collation" => &["oid", "collname"],
        "pg_enum" => &["oid", "enumtypid", "enumlabel", "enumsortorder"],
        "pg_range" => &["rngtypid", "rngsubtype"],
        "pg_tablespace" => &["oid", "spcname"],
        "pg_policy" => &["oid", "polname", "polrelid"],
        "pg_trigger" => &["oid", "tgrelid", "tgname"],
        "pg_rewrite" => &["oid", "ev_class", "rulename"],
        "pg_statistic_ext" => &["oid", "stxrelid", "stxname"],
        "pg_publication" => &["oid", "pubname"],
        "pg_partitioned_table" => &["partrelid"],
        "pg_foreign_table" => &["ftrelid"],
        "pg_sequence" => &["seqrelid"],
        "pg_publication_namespace" => &["oid", "pnpubid", "pnnspid"],
        "pg_publication_rel" => &["oid", "prpubid", "prrelid"],
        "pg_statistic_ext_data" => &["stxoid"],
        "pg_depend" => &["classid", "objid", "refclassid", "refobjid"],
        "pg_shdescription" => &["objoid", "classoid", "description"],
        "pg_event_trigger" => &["oid", "evtname"],
        "pg_opclass" => &["oid", "opcname"],
        "pg_operator" => &["oid", "oprname"],
        "pg_cast" => &["oid", "castsource", "casttarget"],
        "pg_language" => &["oid", "lanname"],
        "pg_auth_members" => &["roleid", "member"],
        "pg_stat_activity" => &[
            "datid",
            "datname",
            "pid",
            "usename",
            "application_name",
            "state",
            "query",
        ],
        "pg_foreign_server" => &["oid", "srvname"],
        "pg_foreign_data_wrapper" => &["oid", "fdwname"],
        _ => {
            return Err(DataFusionError::Plan(format!(
                "pg_catalog.{name} does not exist"
            )));
        }
    };
    let fields: Vec<Field> = columns
        .iter()
        .map(|c| {
            let text = matches!(
                *c,
                "schemaname"
                    | "viewname"
                    | "matviewname"
                    | "definition"
                    | "conname"
                    | "contype"
                    | "adbin"
                    | "description"
                    | "extname"
                    | "extversion"
                    | "proname"
                    | "aggkind"
                    | "collname"
                    | "enumlabel"
                    | "spcname"
                    | "polname"
                    | "tgname"
                    | "rulename"
                    | "stxname"
                    | "pubname"
                    | "evtname"
                    | "opcname"
                    | "oprname"
                    | "lanname"
                    | "datname"
                    | "usename"
                    | "application_name"
                    | "state"
                    | "query"
                    | "srvname"
                    | "fdwname"
            );
            let kind = match *c {
                "indisprimary" | "indisunique" => DataType::Boolean,
                _ if text => DataType::Utf8,
                _ => DataType::Int64,
            };
            Field::new(*c, kind, true)
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    Ok(Arc::new(MemTable::try_new(schema, vec![vec![]])?))
}

const INFO_TABLES: &[&str] = &["tables", "columns", "schemata", "views"];

impl PgSchema {
    fn information_table(
        &self,
        name: &str,
        tables: &[TableInfo],
    ) -> Result<Arc<dyn TableProvider>> {
        let n = tables.len();
        match name {
            "tables" => Builder::new()
                .text("table_catalog", texts(n, self.db.clone()))
                .text("table_schema", texts(n, "public"))
                .text(
                    "table_name",
                    tables.iter().map(|t| Some(t.name.clone())).collect(),
                )
                .text("table_type", texts(n, "BASE TABLE"))
                .text("is_insertable_into", texts(n, "NO"))
                .build(),
            "columns" => {
                let mut rows = Vec::new();
                for t in tables {
                    for (i, f) in t.schema.fields().iter().enumerate() {
                        rows.push((t.name.clone(), f.clone(), i));
                    }
                }
                let m = rows.len();
                Builder::new()
                    .text("table_catalog", texts(m, self.db.clone()))
                    .text("table_schema", texts(m, "public"))
                    .text(
                        "table_name",
                        rows.iter().map(|r| Some(r.0.clone())).collect(),
                    )
                    .text(
                        "column_name",
                        rows.iter().map(|r| Some(r.1.name().clone())).collect(),
                    )
                    .int(
                        "ordinal_position",
                        rows.iter().map(|r| r.2 as i64 + 1).collect(),
                    )
                    .text("column_default", nulls(m))
                    .text(
                        "is_nullable",
                        rows.iter()
                            .map(|r| Some(if r.1.is_nullable() { "YES" } else { "NO" }))
                            .collect(),
                    )
                    .text(
                        "data_type",
                        rows.iter()
                            .map(|r| {
                                let ty = pg_type_of(r.1.data_type());
                                Some(if ty.oid == 1009 { "ARRAY" } else { ty.sql_name })
                            })
                            .collect(),
                    )
                    .text(
                        "udt_name",
                        rows.iter()
                            .map(|r| Some(pg_type_of(r.1.data_type()).name))
                            .collect(),
                    )
                    .text("udt_schema", texts(m, "pg_catalog"))
                    .build()
            }
            "schemata" => Builder::new()
                .text("catalog_name", texts(3, self.db.clone()))
                .text(
                    "schema_name",
                    vec![
                        Some("public"),
                        Some("pg_catalog"),
                        Some("information_schema"),
                    ],
                )
                .text("schema_owner", texts(3, OWNER))
                .build(),
            "views" => Builder::new()
                .text("table_catalog", Vec::<Option<String>>::new())
                .text("table_schema", Vec::<Option<String>>::new())
                .text("table_name", Vec::<Option<String>>::new())
                .text("view_definition", Vec::<Option<String>>::new())
                .build(),
            other => Err(DataFusionError::Plan(format!(
                "information_schema.{other} does not exist"
            ))),
        }
    }
}

#[async_trait]
impl SchemaProvider for PgSchema {
    fn table_names(&self) -> Vec<String> {
        self.names().iter().map(|s| s.to_string()).collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if !self.names().contains(&name) {
            return Ok(None);
        }
        self.build(name).await.map(Some)
    }

    fn table_exist(&self, name: &str) -> bool {
        self.names().contains(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_oids_are_stable_and_outside_the_reserved_range() {
        assert_eq!(table_oid("cpu"), table_oid("cpu"));
        assert_ne!(table_oid("cpu"), table_oid("mes_events"));
        assert!(table_oid("x") >= 100_000);
        assert!(table_oid("x") < i64::from(i32::MAX));
    }

    #[test]
    fn historian_columns_have_postgres_types() {
        use arrow::datatypes::TimeUnit;
        assert_eq!(
            pg_type_of(&DataType::Timestamp(TimeUnit::Nanosecond, None)).sql_name,
            "timestamp without time zone"
        );
        assert_eq!(pg_type_of(&DataType::Float64).sql_name, "double precision");
        assert_eq!(
            pg_type_of(&DataType::Dictionary(
                Box::new(DataType::Int32),
                Box::new(DataType::Utf8)
            ))
            .sql_name,
            "text"
        );
        assert_eq!(format_type(1184), Some("timestamp with time zone"));
    }
}
