"""The ClickHouse store: events, rollups, sessions and the catalog in ClickHouse, one server or a cluster."""
