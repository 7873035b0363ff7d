"""The notes service on Litestar: the container's providers behind Litestar's own `Provide`."""
