"""A simulated payment provider (PSP) with its own state and realistic failure modes."""
