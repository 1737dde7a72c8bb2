"""Scheduled and on-demand runs that settle payments webhooks missed."""
