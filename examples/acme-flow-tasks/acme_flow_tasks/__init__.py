"""ACME's flowsvc tasks: `acme_save_customer` (sync, sqlite3) and `acme_welcome` (async)."""
