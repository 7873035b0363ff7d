"""The notes service on plain Starlette: `@inject` endpoints, one session per request."""
