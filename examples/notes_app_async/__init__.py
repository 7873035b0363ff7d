"""The notes service on AsyncSession: async repositories, services and endpoints, one session per request.

Run it: `uvicorn examples.notes_app_async.main:app` (SQLite through aiosqlite; set
NOTES_DATABASE_URL=postgresql+psycopg://user@host/db for PostgreSQL).
"""
