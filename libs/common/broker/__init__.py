"""RabbitMQ: topology, a confirming publisher and a consumer runner with ack discipline."""
