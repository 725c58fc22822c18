"""Flower glue: ServerApp, ClientApp and the server-side strategies."""
