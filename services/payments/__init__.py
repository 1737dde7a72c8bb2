"""Consumes payment.requested: records payments and asks the provider to charge them."""
