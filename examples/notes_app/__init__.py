"""A small users-and-notes service: FastAPI + SQLAlchemy + dependency-injector, one session per request."""
