"""What every service shares: configuration, logging, database, broker, messages, metrics,
the payment state machine and the aiohttp application skeleton."""
