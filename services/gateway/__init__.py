"""HTTP edge: payment intake, webhook intake and read APIs; publishes to RabbitMQ."""
