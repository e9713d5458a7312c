"""The SQLite store's read side: one module per way of answering, and the queries built from them."""
