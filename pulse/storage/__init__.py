"""SQLite storage: schema, the single writer, queries, projects and keys. The only package that imports apsw."""
