"""A small shop on Flask + SQLAlchemy + dependency-injector: one session per request, under WSGI."""
