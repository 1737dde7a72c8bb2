"""Consumes webhook.received: records provider events once and applies them to payments."""
