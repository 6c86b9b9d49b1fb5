"""Shipped test doubles and helpers (as fabric.testing): a fake Provider, host daemons for real tests."""
